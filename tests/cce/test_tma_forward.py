"""The GEMM path's descriptor-fed forward (kernels/tma_forward.py) against float64 and the cuBLAS-slab forward.

On the CPU it runs under the Triton interpreter (LMFORGE_CCE_TMA=1 forces it there); on an H200 the same
tests run the compiled kernel, which is also what impl="gemm" uses by default for 16-bit inputs.
"""

import pytest
import torch

from lmforge.cce import configs, gemm_impl, linear_cross_entropy
from tests.cce.test_api import D, N, V, backward_both, make_inputs, reference, rel_err
from tests.conftest import DEVICE


def float64_stats(e, c, b, t, softcap, perm, cols):
    """lse, target logit, logit sum, softmax-mean logit and the per-slab lse table, in float64."""
    z = e.double() @ c.double().T
    if b is not None:
        z = z + b.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, 1)
    valid = (t >= 0) & (t < z.shape[1])
    tgt = torch.where(valid, z.gather(1, t.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
    mu = (torch.softmax(z, 1) * z).sum(1)
    zs = z[:, perm.long()] if perm is not None else z
    table = torch.stack([torch.logsumexp(zs[:, i:i + cols], 1) for i in range(0, z.shape[1], cols)])
    return lse, tgt, z.sum(1), mu, table


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cols", [16, 32, 48, V])  # splits = slabs (16), slabs cut in parts, one slab
@pytest.mark.parametrize("sorted_order", [False, True])
def test_tma_forward_matches_float64_and_the_slab_forward(monkeypatch, dtype, cols, sorted_order):
    e, c, t, b = make_inputs(dtype, ignore_frac=0.2, with_bias=True)
    e, c, b = e.detach(), c.detach(), b.detach()
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(cols * N * 4 / 2**20))
    assert gemm_impl.slab_columns(N, V) == cols
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.int32) \
        if sorted_order else None
    results = {}
    for tma in ("1", "0"):
        monkeypatch.setenv("LMFORGE_CCE_TMA", tma)
        assert gemm_impl.tma_applies(e, c) == (tma == "1")
        table = torch.full((gemm_impl.n_slabs(N, V), N), float("nan"), device=DEVICE)
        stats = gemm_impl.forward_stats(e, c, b, t, softcap=3.0, need_sum=True, need_mu=True, perm=perm,
                                        slab_lse=table)
        results[tma] = (*stats, table)
    ref = float64_stats(e.cpu(), c.cpu(), b.cpu(), t.cpu(), 3.0, perm.cpu() if perm is not None else None, cols)
    for got, want in zip(results["1"], ref):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    for got, slab in zip(results["1"], results["0"]):  # the same fp32 products as cuBLAS's slabs
        torch.testing.assert_close(got, slab, rtol=1e-5, atol=1e-5)


def force_plan(monkeypatch, rows, piece):
    """Make gemm_impl.backward split rows into chunks of ``rows`` and slabs into ``piece``-column pieces (a
    budget is set, so that every order and size asks backward_plan)."""
    monkeypatch.setenv("LMFORGE_CCE_BWD_MB", "1")
    monkeypatch.setattr(gemm_impl, "backward_plan", lambda n, d, v, cols, **kw: (min(rows, n), min(piece, cols)))


@pytest.mark.parametrize("pieces", [False, True])
@pytest.mark.parametrize("filter_eps", [None, 2.0 ** -10])
def test_gemm_loss_with_the_tma_forward_matches_float64(monkeypatch, filter_eps, pieces):
    # The whole autograd path: the forward's table (sorted order, gathered classifier rows) drives the
    # filtered backward exactly as the cuBLAS forward's does.
    monkeypatch.setenv("LMFORGE_CCE_TMA", "1")
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(32 * N * 4 / 2**20))
    if pieces:  # the backward runs over three row chunks and visits each 32-column slab in two pieces
        force_plan(monkeypatch, 16, 16)
    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", 1)  # this small shape filters too
    e, c, t, b = make_inputs(torch.bfloat16, ignore_frac=0.2, with_bias=True, scale=3.0)
    out = linear_cross_entropy(e, c, t, bias=b, impl="gemm", softcap=5.0, filter_eps=filter_eps,
                               reduction="none")
    ref, _, (e64, c64, b64) = reference(e, c, t, b, softcap=5.0, reduction="none")
    backward_both(out, ref)
    assert rel_err(out, ref) < 1e-3
    for got, want in ((e.grad, e64.grad), (c.grad, c64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want) < 1.2e-2


@pytest.mark.parametrize("pieces", [False, True])  # each slab whole, or in 16-column pieces and 16-row chunks
@pytest.mark.parametrize("cols", [32, V])  # several slabs (the last ragged), one slab
@pytest.mark.parametrize("sorted_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tma_logit_gradient_matches_float64_and_the_slab_backward(monkeypatch, cols, sorted_order, pieces, dtype):
    # kernels/tma_grad.py: dz from E and C on chip instead of cuBLAS's fp32 slab and the in-place pass,
    # with every upstream gradient (lse, target logit, logit sum, softmax-mean logit), bias and softcap.
    e, c, t, b = make_inputs(dtype, ignore_frac=0.2, with_bias=True, scale=2.0)
    e, c, b = e.detach(), c.detach(), b.detach()
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(cols * N * 4 / 2**20))
    if pieces:
        force_plan(monkeypatch, 16, 16)
    g = torch.Generator().manual_seed(5)
    grads = [(torch.randn(N, generator=g, dtype=torch.float64) / N) for _ in range(4)]
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.int32) \
        if sorted_order else None
    e64, c64, b64 = (x.detach().cpu().double().requires_grad_() for x in (e, c, b))
    lse, tgt, zsum, mu, _ = float64_stats(e64, c64, b64, t.cpu(), 3.0, None, V)
    sum(gr * stat for gr, stat in zip(grads, (lse, tgt, zsum, mu))).sum().backward()
    results, widths = {}, []
    classifier_slab = gemm_impl._classifier_slab
    monkeypatch.setattr(gemm_impl, "_classifier_slab",
                        lambda c, perm, start, w, buf: widths.append(w) or classifier_slab(c, perm, start, w, buf))
    for tma in ("1", "0"):
        monkeypatch.setenv("LMFORGE_CCE_TMA", tma)
        assert gemm_impl.tma_applies(e, c, backward=True) == (tma == "1")
        results[tma] = gemm_impl.backward(e, c, b, t, lse.float().to(DEVICE), mu.detach().float().to(DEVICE),
                                          *(gr.float().to(DEVICE) for gr in grads), softcap=3.0, need_db=True,
                                          perm=perm)
    chunks = -(-N // 16) if pieces else 1
    assert max(widths) == (16 if pieces else min(cols, V)) and sum(widths) == 2 * chunks * V  # once per chunk
    for got, slab, want in zip(results["1"], results["0"], (e64.grad, c64.grad, b64.grad)):
        assert rel_err(got, want) < 1e-2
        assert rel_err(got, slab) < 1e-2  # dz rounds to bf16 in both; their fp32 products may differ


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_a_bad_backward_budget_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("LMFORGE_CCE_BWD_MB", value)
    with pytest.raises(ValueError, match="LMFORGE_CCE_BWD_MB"):
        gemm_impl.backward_budget()


def test_tma_applies_only_where_a_descriptor_can_read_the_rows(monkeypatch):
    e, c, _, _ = make_inputs(torch.bfloat16)
    monkeypatch.setenv("LMFORGE_CCE_TMA", "1")
    assert gemm_impl.tma_applies(e, c)
    assert not gemm_impl.tma_applies(e.float(), c.float())  # fp32 keeps cuBLAS's fp32 products
    odd = torch.zeros(N, D + 1, dtype=torch.bfloat16, device=DEVICE)[:, :D]  # 82-byte rows: no descriptor
    assert not gemm_impl.tma_applies(odd, c)
    assert not gemm_impl.tma_applies(e.t(), c)
    monkeypatch.setenv("LMFORGE_CCE_TMA", "0")
    assert not gemm_impl.tma_applies(e, c)
    monkeypatch.setenv("LMFORGE_CCE_TMA", "auto")
    auto = gemm_impl.tma_applies(e, c)  # Hopper GPUs only
    assert gemm_impl.tma_applies(e, c, backward=True) == auto
    monkeypatch.setenv("LMFORGE_CCE_TMA", "forward")  # the forward as by default, the backward on cuBLAS slabs
    assert gemm_impl.tma_applies(e, c) == auto and not gemm_impl.tma_applies(e, c, backward=True)
    monkeypatch.setenv("LMFORGE_CCE_TMA", "yes")
    with pytest.raises(ValueError, match="LMFORGE_CCE_TMA"):
        gemm_impl.tma_applies(e, c)


@pytest.mark.parametrize("n_blocks,n_slab,slab_tiles,sms", [
    (64, 1, 1000, 132),  # Gemma 2 2B on an H200, exact order: v3.6 chose 9 splits, 4.4 waves
    (64, 1, 192, 132),  # SmolLM2
    (64, 63, 16, 132),  # Gemma's sorted order: 63 slabs fill the GPU unsplit
    (1, 1, 1000, 132), (8, 1, 1000, 132), (256, 1, 1000, 132), (32, 1, 1002, 114), (3, 7, 1, 4), (3, 1, 7, 4),
])
def test_tma_splits_cover_each_slab_in_whole_tiles_and_fill_the_waves(n_blocks, n_slab, slab_tiles, sms):
    sub, cols = gemm_impl.tma_splits(n_blocks, n_slab, slab_tiles, sms, 256)
    per = cols // 256
    assert cols % 256 == 0 and sub * per >= slab_tiles > (sub - 1) * per  # every split non-empty
    programs = n_blocks * n_slab * sub
    waves = -(-programs // sms)
    efficiency = n_blocks * n_slab * slab_tiles / (waves * sms * per)
    # Brute force over every split count: none that keeps >= 4 waves (where the work allows) is better by
    # more than the 5% the choice may give up for fewer splits.
    floor = min(4 * sms, n_blocks * n_slab * slab_tiles)
    assert programs >= floor
    for k in range(1, slab_tiles + 1):
        p = -(-slab_tiles // k)
        s = -(-slab_tiles // p)
        if n_blocks * n_slab * s >= floor:
            other = n_blocks * n_slab * slab_tiles / (-(-n_blocks * n_slab * s // sms) * sms * p)
            assert efficiency >= min(0.95, other) - 1e-9
    if (n_blocks, n_slab, slab_tiles, sms) == (64, 1, 1000, 132):
        assert efficiency >= 0.95 and sub != 9


@pytest.mark.parametrize("impl", ["gemm", "triton"])
def test_forward_without_autograd_does_not_sort_for_filtering(monkeypatch, impl):
    # Filtering serves the backward: under no_grad (inference, log-probabilities) the forward must not pay
    # for the sorted order, and its statistics are those of the exact forward.
    from lmforge.cce import order, triton_impl

    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", 1)
    calls = []
    module = order if impl == "gemm" else triton_impl  # the GEMM path's slabs, the fused kernels' full sort
    sort = module.vocab_order
    monkeypatch.setattr(module, "vocab_order", lambda *a: calls.append(1) or sort(*a))
    e, c, t, _ = make_inputs(torch.bfloat16)
    with torch.no_grad():
        inference = linear_cross_entropy(e, c, t, impl=impl, filter_eps=2.0 ** -10, reduction="none")
    assert calls == []
    exact = linear_cross_entropy(e, c, t, impl=impl, filter_eps=None, reduction="none")
    assert torch.equal(inference, exact.detach())
    linear_cross_entropy(e, c, t, impl=impl, filter_eps=2.0 ** -10).backward()
    assert calls  # with autograd the same call sorts


@pytest.mark.parametrize("tma", ["1", "0"])
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("cols", [16, 40])
def test_compact_table_bounds_every_slab_from_above_within_its_code_step(monkeypatch, tma, group, cols):
    # Both forwards fill a SlabTable: the grouped Hopper kernel (codes written in its epilogue) and cuBLAS
    # slabs (the float32 table encoded). Statistics are those of the float32 table's forward, and each decoded
    # bound lies above the float64 slab log-sum-exp by at most one code step plus how much the group's
    # log-sum-exp grew after that slab. 40 columns: slabs of several tiles whose last tile is partial (the
    # interpreter's tiles are 16 wide), and a last slab of 21 columns.
    e, c, t, b = make_inputs(torch.bfloat16, ignore_frac=0.2, with_bias=True, scale=3.0)
    e, c, b = e.detach(), c.detach(), b.detach()
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(cols * N * 4 / 2**20))
    monkeypatch.setenv("LMFORGE_CCE_TMA", tma)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.int32)
    n_slab = gemm_impl.n_slabs(N, V)
    table = gemm_impl.SlabTable(torch.full((-(-n_slab // group), N), float("nan"), device=DEVICE),
                                torch.zeros((n_slab, N), dtype=torch.uint8, device=DEVICE), group)
    stats = gemm_impl.forward_stats(e, c, b, t, softcap=3.0, perm=perm, slab_lse=table)
    plain = torch.empty((n_slab, N), device=DEVICE)
    want = gemm_impl.forward_stats(e, c, b, t, softcap=3.0, perm=perm, slab_lse=plain)
    for got, expected in zip(stats, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ref = float64_stats(e.cpu(), c.cpu(), b.cpu(), t.cpu(), 3.0, perm.cpu(), cols)[-1]
    padded = torch.cat([ref, torch.full((-n_slab % group, N), float("-inf"), dtype=torch.float64)])
    running = torch.logcumsumexp(padded.view(-1, group, N), 1)
    growth = (running[:, -1:] - running).reshape(-1, N)[:n_slab]  # the group's lse after the slab vs at it
    bound = table.bounds().double().cpu()
    assert bool((bound >= ref - 1e-5).all())
    assert bool((bound <= ref + growth + 1 / gemm_impl.CODE_SCALE + 1e-5).all())
    # and tight where the backward adds them up: a row's decoded slab masses sum to within ~6% (a code step)
    # of its whole mass, where decoding every code against its group's total would count a group of similar
    # slabs several times over (here up to 2.0x with groups of 3)
    overcount = torch.exp(bound - torch.logsumexp(ref, 0)).sum(0)
    assert float(overcount.max()) <= 1.1
    torch.testing.assert_close(table.lse.double().cpu(), running[:, -1], rtol=1e-5, atol=1e-5)
    encoded = gemm_impl.encode_table(plain, group)  # the kernel's codes are the encoding's, up to fp32 rounding
    assert int((table.codes.int() - encoded.codes.int()).abs().max()) <= 1


@pytest.mark.parametrize("table", ["none", "grouped"])
def test_banded_launch_order_gives_the_row_major_results(monkeypatch, table):
    # lse_tma_kernel's banded launch order (BAND > 0) only renumbers the programs: each (row block, part)
    # must still run exactly once. Bands of 2 row blocks over 3 row blocks of this device's tiles (one full
    # band and a partial one) and 8 vocabulary tiles (split, or slabs of one tile in 4 groups of 2), against
    # the row-major order, bit for bit, and float64. Sized from the tiles: at the GPU's 128 x 256 tiles the
    # module's 37 x 101 problem is one program.
    cfg = configs.config_for("tma", torch.bfloat16, torch.device(DEVICE), D)
    n, v = 2 * cfg["BLOCK_N"] + 5, 7 * cfg["BLOCK_V"] + 3
    e, c, t, b = make_inputs(torch.bfloat16, n=n, v=v, ignore_frac=0.2, with_bias=True, scale=3.0)
    e, c, b = e.detach(), c.detach(), b.detach()
    monkeypatch.setenv("LMFORGE_CCE_TMA", "1")
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(cfg["BLOCK_V"] * n * 4 / 2**20))
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(7)).to(DEVICE, torch.int32)
    n_slab, seen = gemm_impl.n_slabs(n, v), []
    assert n_slab == 8
    results = {}
    for band in (0, 2):
        monkeypatch.setattr(gemm_impl, "launch_band", lambda n_parts, band=band: seen.append(n_parts) or band)
        if table == "grouped":
            tab = gemm_impl.SlabTable(torch.full((-(-n_slab // 2), n), float("nan"), device=DEVICE),
                                      torch.zeros((n_slab, n), dtype=torch.uint8, device=DEVICE), 2)
            stats = gemm_impl.forward_stats(e, c, b, t, softcap=3.0, perm=perm, slab_lse=tab)
            results[band] = (*stats, tab.lse, tab.codes)
        else:
            results[band] = gemm_impl.forward_stats(e, c, b, t, softcap=3.0, need_sum=True, need_mu=True)
    assert min(seen) >= 3  # several parts: the bands hold more than one program per row block
    for banded, row_major in zip(results[2], results[0]):
        assert torch.equal(banded, row_major)
    ref = float64_stats(e.cpu(), c.cpu(), b.cpu(), t.cpu(), 3.0, None, v)
    torch.testing.assert_close(results[2][0].double().cpu(), ref[0], rtol=1e-5, atol=1e-5)


def test_launch_band_where_measured_faster():
    assert gemm_impl.launch_band(10) == gemm_impl.launch_band(4) == gemm_impl.BAND_ROWS == 16
    assert gemm_impl.launch_band(3) == gemm_impl.launch_band(1) == 0


@pytest.mark.parametrize("n,n_slab,sms,block_n,want", [(8192, 63, 132, 128, 16), (8192, 32, 132, 128, 8),
                                                       (8192, 38, 132, 128, 10), (8192, 63, 4, 128, 63),
                                                       (256, 10, 132, 128, 1)])
def test_slabs_per_group_fill_whole_waves_with_the_fewest_groups(n, n_slab, sms, block_n, want):
    per = gemm_impl.slabs_per_group(n, n_slab, sms, block_n)
    assert per == want
    blocks, groups = -(-n // block_n), -(-n_slab // per)
    waves = -(-blocks * groups // sms)
    if blocks * n_slab >= sms:  # enough work for a wave: at least a wave, and under 10% of SM-time idle
        assert blocks * groups >= sms and blocks * n_slab / (waves * sms * per) >= 0.9

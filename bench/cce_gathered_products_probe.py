"""How fast are the filtered backward's two products when they read their operands through the permutations?

Route (c) to issue 3's memory target with filtering (docs/cce-tuning.md, "Routes weighed in the eleventh
session") drops the sorted order's two gathered copies: the classifier slab C[perm[slab]] (18 MiB at Gemma 2
2B's shape) and the chunk's rows E[order[chunk]] (kept in dE's rows today, which then cannot hold dE's own
accumulator). Both products would read those rows by pointer instead:

* ``de``: acc[k, D] += dz[k, W] @ C[perm[start:start + W], :] (fp32 accumulator, read and written, as the
  shipped cuBLAS addmm does), the gathered rows along the product's K;
* ``dc``: dC[perm[start + i], :] = (dz^T E[order[:k], :])[i, :], E's rows gathered along K, the output rows
  scattered into dC (what the shipped path does with cuBLAS into a buffer + scatter_rows);
* ``de_hilo``: ``de`` with route (c)'s accumulator, the running sum in bf16 (in dE's own rows there) plus an
  int8 remainder in 256ths of its spacing: 3 bytes per entry read and written instead of fp32's 4, and the
  result is the exact sum rounded once (the self-test checks it against float64 over five slabs).

This probe times both as plain Triton GEMMs (pointer loads, so the gathers cost nothing extra to express)
against what ships: index_select of the operand rows + cuBLAS on contiguous operands (+ the scatter for dC),
at the Gemma shape's slab (W = 4096, D = 2304) for the row counts a depth-ordered slab sees. If the gathered
products run near cuBLAS's rate, route (c) is worth building; if they lose more than the gathers they save
(~20% was the forward's loss from its gathered C, 16.3 against 13.3 ms), it is not.

    python bench/cce_gathered_products_probe.py --selftest      # CPU, TRITON_INTERPRET=1: against float64
    python bench/cce_gathered_products_probe.py --out probe.json  # GPU: microseconds per product and TFLOP/s

Measured on an H100 in the twelfth session (bench/results/cce_h100_2026-12-07c_calls.json; docs/cce-tuning.md):
the gathers cost nothing, but these Triton GEMMs reach 160-310 TFLOP/s against cuBLAS's 400-640 (dE 2.1-2.4x
the shipped time at 1024-4096 rows), so route (c) was dropped.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

if "--selftest" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lmforge.cce import gemm_impl  # noqa: E402
from lmforge.cce.benchmark import cuda_event_times  # noqa: E402
from lmforge.cce.triton_impl import interpreting  # noqa: E402


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32; under the interpreter (``UPCAST``) from fp32 copies, since it multiplies 16-bit tiles
    as raw bits."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _bf16_rtne(x):
    """x rounded to the nearest bfloat16 (ties to even), still as float32 (its low 16 bits zero)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_ulp(hi):
    """The spacing of bfloat16 values at |hi| (2^(exponent - 7)), at least 2^-126."""
    exp_bits = tl.maximum(hi.to(tl.uint32, bitcast=True) & 0x7F800000, 8 << 23)
    return (exp_bits - (7 << 23)).to(tl.float32, bitcast=True)


@triton.jit
def de_gathered_kernel(DZ, C, Perm, Acc, Lo, OutRows, k, W, D, stride_dz, stride_c, stride_acc,
                       HILO: tl.constexpr, SCATTER: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Acc[:k] += DZ[:k, :W] @ C[Perm[:W]] (Perm already offset to the slab's start).

    ``HILO``: the accumulator is Acc (bf16: the running sum rounded, where route (c) keeps it in dE's own rows)
    plus Lo (int8: the rounding's remainder in 256ths of Acc's spacing), 3 bytes per entry instead of fp32's 4,
    the sum kept to ~2^-16 of its size. ``SCATTER``: the accumulator's row for dz's row r is OutRows[r] (route
    (c) keeps it in dE's own rows, the tokens' order, while dz's rows come in depth order)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < k, cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, W, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kk_ok = kk < W
        a = tl.load(DZ + rows[:, None].to(tl.int64) * stride_dz + kk[None, :],
                    mask=row_ok[:, None] & kk_ok[None, :], other=0.0)
        vocab_rows = tl.load(Perm + kk, mask=kk_ok, other=0).to(tl.int64)
        b = tl.load(C + vocab_rows[:, None] * stride_c + cols[None, :], mask=kk_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = _mma(a, b, acc, UPCAST)
    if SCATTER:
        out_rows = tl.load(OutRows + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        out_rows = rows.to(tl.int64)
    offs = out_rows[:, None] * stride_acc + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if HILO:
        hi = tl.load(Acc + offs, mask=mask, other=0.0).to(tl.float32)
        lo = tl.load(Lo + offs, mask=mask, other=0).to(tl.float32)
        value = hi + lo * (_bf16_ulp(hi) * (1.0 / 256.0)) + acc
        new_hi = _bf16_rtne(value)
        rest = (value - new_hi) / _bf16_ulp(new_hi) * 256.0
        rest = tl.minimum(tl.maximum(rest, -127.0), 127.0)
        rest = tl.where(rest >= 0, tl.floor(rest + 0.5), -tl.floor(0.5 - rest))
        tl.store(Acc + offs, new_hi.to(Acc.dtype.element_ty), mask=mask)
        tl.store(Lo + offs, rest.to(tl.int8), mask=mask)
    else:
        tl.store(Acc + offs, acc + tl.load(Acc + offs, mask=mask, other=0.0), mask=mask)


@triton.jit
def dc_gathered_kernel(DZ, E, Order, Perm, DC, k, W, D, stride_dz, stride_e, stride_dc,
                       UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DC[Perm[i]] = sum_r DZ[r, i] E[Order[r]] for i < W (Perm offset to the slab's start), rounded once."""
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok, col_ok = slots < W, cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in tl.range(0, k, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        rr_ok = rr < k
        a = tl.load(DZ + rr[None, :].to(tl.int64) * stride_dz + slots[:, None],
                    mask=slot_ok[:, None] & rr_ok[None, :], other=0.0)  # dz^T tile
        e_rows = tl.load(Order + rr, mask=rr_ok, other=0).to(tl.int64)
        b = tl.load(E + e_rows[:, None] * stride_e + cols[None, :], mask=rr_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = _mma(a, b, acc, UPCAST)
    vocab_rows = tl.load(Perm + slots, mask=slot_ok, other=0).to(tl.int64)
    tl.store(DC + vocab_rows[:, None] * stride_dc + cols[None, :], acc.to(DC.dtype.element_ty),
             mask=slot_ok[:, None] & col_ok[None, :])


def de_gathered(dz, c, perm_slab, acc, cfg, lo=None, out_rows=None):
    """acc[out_rows] += dz @ c[perm_slab] (out_rows: default dz's own rows): acc fp32, or (``lo`` given) acc
    bf16 with lo's int8 remainders."""
    k, w = dz.shape
    d = c.shape[1]
    grid = (triton.cdiv(k, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_N"]))
    extra = {} if interpreting() else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    de_gathered_kernel[grid](dz, c, perm_slab, acc, lo if lo is not None else acc,
                             out_rows if out_rows is not None else perm_slab, k, w, d, dz.stride(0),
                             c.stride(0), acc.stride(0), HILO=lo is not None, SCATTER=out_rows is not None,
                             UPCAST=interpreting(),
                             BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **extra)


def dc_gathered(dz, e, order, perm_slab, dc, cfg):
    k, w = dz.shape
    d = e.shape[1]
    grid = (triton.cdiv(w, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_N"]))
    extra = {} if interpreting() else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    dc_gathered_kernel[grid](dz, e, order, perm_slab, dc, k, w, d, dz.stride(0), e.stride(0), dc.stride(0),
                             UPCAST=interpreting(), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                             BLOCK_K=cfg["BLOCK_K"], **extra)


def shipped_de(dz, c, perm_slab, acc, c_buffer):
    """What ships: the classifier slab gathered, then cuBLAS's fp32-output product added into acc."""
    torch.index_select(c, 0, perm_slab, out=c_buffer)
    gemm_impl._accumulate_matmul(acc, dz, c_buffer)


def shipped_dc(dz, e, order, perm_slab, dc, e_buffer, c_buffer):
    """What ships: the rows gathered (today into dE's rows), cuBLAS into the classifier buffer, the scatter."""
    torch.index_select(e, 0, order, out=e_buffer)
    torch.mm(dz.t(), e_buffer, out=c_buffer)
    gemm_impl.scatter_rows(dc, perm_slab, c_buffer, add=False)


def inputs(n, d, vocab, k, w, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    e = (torch.randn(n, d, generator=g) / d ** 0.25).to(torch.bfloat16).to(device)
    c = (torch.randn(vocab, d, generator=g) / d ** 0.25).to(torch.bfloat16).to(device)
    dz = (torch.randn(k, w, generator=g) * 1e-3).to(torch.bfloat16).to(device)
    perm = torch.randperm(vocab, generator=g).to(torch.int32).to(device)
    order = torch.randperm(n, generator=g)[:k].to(torch.int32).to(device)
    return e, c, dz, perm, order


CONFIGS = [dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
           dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
           dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)]


def selftest():
    n, d, vocab, k, w = 40, 48, 100, 33, 37
    e, c, dz, perm, order = inputs(n, d, vocab, k, w, "cpu")
    perm_slab = perm[20:20 + w]
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)
    acc = torch.randn(k, d, dtype=torch.float32)
    want = acc.double() + dz.double() @ c[perm_slab.long()].double()
    de_gathered(dz, c, perm_slab, acc, cfg)
    assert torch.allclose(acc.double(), want, rtol=1e-5, atol=1e-6), (acc.double() - want).abs().max()
    # Five slabs accumulated in bf16 + int8 remainders: the result is the float64 sum rounded once to bf16
    # (up to ties), where rounding the running sum in bf16 after every slab drifts.
    hi = torch.zeros(k, d, dtype=torch.bfloat16)
    lo = torch.zeros(k, d, dtype=torch.int8)
    plain = torch.zeros(k, d, dtype=torch.bfloat16)
    exact = torch.zeros(k, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for slab in range(5):
        part = (torch.randn(k, w, generator=g) * (1e-3 if slab else 1.0)).to(torch.bfloat16)
        slab_perm = torch.randperm(vocab, generator=g)[:w].to(torch.int32)
        de_gathered(part, c, slab_perm, hi, cfg, lo=lo)
        product = part.double() @ c[slab_perm.long()].double()
        exact += product
        plain = (plain.double() + product).to(torch.bfloat16)
    once = exact.to(torch.bfloat16)
    assert (hi != once).float().mean() < 0.01, (hi != once).float().mean()
    assert (hi.double() - exact).norm() <= 1.01 * (once.double() - exact).norm()
    assert (plain.double() - exact).norm() > 1.2 * (once.double() - exact).norm()
    # Accumulator rows reached through a permutation of dz's rows (dE's own rows in route (c)).
    rows_perm = torch.randperm(n, generator=g)[:k].to(torch.int32)
    big = torch.randn(n, d, dtype=torch.float32, generator=g)
    want_big = big.double().clone()
    want_big[rows_perm.long()] += dz.double() @ c[perm_slab.long()].double()
    de_gathered(dz, c, perm_slab, big, cfg, out_rows=rows_perm)
    assert torch.allclose(big.double(), want_big, rtol=1e-5, atol=1e-6), (big.double() - want_big).abs().max()
    dc = torch.zeros(vocab, d, dtype=torch.bfloat16)
    dc_gathered(dz, e, order, perm_slab, dc, cfg)
    want_dc = torch.zeros(vocab, d, dtype=torch.float64)
    want_dc[perm_slab.long()] = dz.double().t() @ e[order.long()].double()
    assert torch.allclose(dc.double(), want_dc, rtol=1e-2, atol=1e-6)  # one bf16 rounding (truncated here)
    untouched = torch.ones(vocab, dtype=torch.bool)
    untouched[perm_slab.long()] = False
    assert not dc[untouched].any()
    print("selftest passed: both gathered products match float64; the bf16 + int8 accumulator rounds once")


def _median_us(fn, repeats):
    return statistics.median(cuda_event_times(fn, repeats)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--shape", type=int, nargs=3, default=[8192, 2304, 256000], metavar=("N", "D", "V"))
    ap.add_argument("--cols", type=int, default=4096, help="slab width W")
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 2048, 1024, 512], help="rows k in the slab")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.selftest:
        selftest()
        return
    n, d, vocab = args.shape
    w = args.cols
    results = []
    for k in args.rows:
        e, c, dz, perm, order = inputs(n, d, vocab, k, w, "cuda")
        perm_slab = perm[:w]
        acc = torch.zeros(k, d, dtype=torch.float32, device="cuda")
        dc = torch.zeros(vocab, d, dtype=torch.bfloat16, device="cuda")
        c_buffer = torch.empty(w, d, dtype=torch.bfloat16, device="cuda")
        e_buffer = torch.empty(k, d, dtype=torch.bfloat16, device="cuda")
        flop = 2 * k * w * d
        row = dict(k=k, cols=w, d=d)
        for name, fn in [("shipped_de", lambda: shipped_de(dz, c, perm_slab, acc, c_buffer)),
                         ("shipped_dc", lambda: shipped_dc(dz, e, order, perm_slab, dc, e_buffer, c_buffer)),
                         ("cublas_de_only", lambda: gemm_impl._accumulate_matmul(acc, dz, c_buffer)),
                         ("cublas_dc_only", lambda: torch.mm(dz.t(), e_buffer, out=c_buffer))]:
            fn()
            row[name + "_us"] = _median_us(fn, args.repeats)
        hi = torch.zeros(k, d, dtype=torch.bfloat16, device="cuda")
        lo = torch.zeros(k, d, dtype=torch.int8, device="cuda")
        ident = torch.arange(w, dtype=torch.int32, device="cuda")
        de_rows = torch.empty(n, d, dtype=torch.bfloat16, device="cuda")
        de_lo = torch.zeros(n, d, dtype=torch.int8, device="cuda")
        for i, cfg in enumerate(CONFIGS):
            # "contig": the same Triton kernel on the gathered slab (rows in order): the gather's own cost;
            # "de_hilo_scatter": contiguous slab, bf16 + int8 accumulator in dE's rows reached through order.
            for name, fn in [("de", lambda: de_gathered(dz, c, perm_slab, acc, cfg)),
                             ("de_contig", lambda: de_gathered(dz, c_buffer, ident, acc, cfg)),
                             ("de_hilo", lambda: de_gathered(dz, c, perm_slab, hi, cfg, lo=lo)),
                             ("de_hilo_scatter", lambda: de_gathered(dz, c_buffer, ident, de_rows, cfg, lo=de_lo,
                                                                     out_rows=order)),
                             ("dc", lambda: dc_gathered(dz, e, order, perm_slab, dc, cfg))]:
                try:
                    fn()
                    row[f"{name}_cfg{i}_us"] = _median_us(fn, args.repeats)
                except Exception as err:  # a configuration the GPU cannot hold (shared memory)
                    row[f"{name}_cfg{i}_error"] = str(err)[:200]
        # Check the gathered products against the shipped ones on these inputs.
        acc.zero_()
        shipped_de(dz, c, perm_slab, acc, c_buffer)
        ref = acc.clone()
        acc.zero_()
        de_gathered(dz, c, perm_slab, acc, CONFIGS[0])
        row["de_rel_diff"] = ((acc - ref).norm() / ref.norm()).item()
        shipped_dc(dz, e, order, perm_slab, dc, e_buffer, c_buffer)
        ref_dc = dc[perm_slab.long()].float()
        dc_gathered(dz, e, order, perm_slab, dc, CONFIGS[0])
        row["dc_rel_diff"] = ((dc[perm_slab.long()].float() - ref_dc).norm() / ref_dc.norm()).item()
        for key in [x for x in row if x.endswith("_us")]:
            row[key.replace("_us", "_tflops")] = flop / (row[key] * 1e-6) / 1e12
        print(json.dumps(row), flush=True)
        results.append(row)
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               shape=args.shape, rows=results)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Could dE's softmax product run in fp8 (e4m3) within the issue's accuracy bound, and what would it save?

For the mean loss dE = (P C - C[targets]) / n, P the softmax. lmforge forms P C from bf16 products (the logit
gradient rounded to bf16, fp32 accumulation). Where the softmax is flat (random data) P C is a small share of
dE's norm, the target rows dominate, so P C could take coarser products: half the tensor-core time per FLOP
in e4m3. This probe computes dE that way, P C from e4m3 operands (P scaled per row to e4m3's range, each
classifier piece per tensor; fp32 accumulation, which an fp8 GEMM also does) and C[targets] apart in fp32, and
reports against float64:

* dE's relative error, lmforge's and plain torch's beside it, and the issue's bound (1.5x torch's);
* the softmax product's share of dE's norm;
* a per-row estimate of the fp8 product's error that a kernel could form on the fly,
  EST x sqrt(sum_v p_v^2 |C_v|^2) (independent e4m3 roundings of both operands), against each row's measured
  error, and the share of rows whose estimate would exceed the room the bound leaves (those would need bf16).

On a GPU it also times one backward step's dE product as shipped (bf16 operands added into the fp32
accumulator) against torch._scaled_mm on e4m3 operands (fp32 out, then added) and against a Triton kernel that
does what an fp8 backward step would (the e4m3 product, QGMMA on sm_90, with each row's scale and the
accumulator's read-add-write in its epilogue; a few tile configurations), and the classifier piece's conversion
to e4m3 (transposed, as the fp8 GEMM wants its second operand).

    python bench/cce_fp8_probe.py --shape gemma2-2b --regime random [--rows 2816 --piece 4096] [--out ...]
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from lmforge.cce import gemm_impl, linear_cross_entropy  # noqa: E402
from lmforge.cce.benchmark import _rel, float64_reference, parse_shape, torch_loss  # noqa: E402
from lmforge.cce.kernels.fp8 import fp8_accumulate_kernel  # noqa: E402
from lmforge.cce.regimes import make_inputs  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# The error model of an e4m3 product (gemm_impl.FP8_EST, which the backward's check uses too).
EST = gemm_impl.FP8_EST


def fp8_accumulate(acc, a8, b8t, row_scale, col_scale: float, cfg=(128, 128, 128, 8, 4)):
    """acc += (a8 @ b8t^T) * row_scale[:, None] * col_scale by lmforge's :func:`fp8_accumulate_kernel`;
    ``cfg``: BLOCK_M, BLOCK_N, BLOCK_K, warps, stages. A two-dimensional ``row_scale`` (M x cdiv(K, BLOCK_K))
    scales each BLOCK_K block of the product by its own column (the backward's way)."""
    block_m, block_n, block_k, warps, stages = cfg
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    (m, k), n = a8.shape, b8t.shape[0]
    k_scaled = row_scale.dim() == 2
    if k_scaled and row_scale.shape != (m, triton.cdiv(k, block_k)):
        raise ValueError(f"block scales {tuple(row_scale.shape)} for M={m}, K={k}, BLOCK_K={block_k}")
    scale = row_scale if k_scaled else row_scale[:, None]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    fp8_accumulate_kernel[grid](TensorDescriptor.from_tensor(a8, [block_m, block_k]),
                                TensorDescriptor.from_tensor(b8t, [block_n, block_k]), acc, scale,
                                float(col_scale), scale, scale, m, n, k, acc.stride(0), scale.stride(0),
                                SCALE_K=block_k, PER_BLOCK=k_scaled, ESTIMATE=False, UPCAST=interpret,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                **({} if interpret else dict(num_warps=warps, num_stages=stages)))


def kernel_error(m: int, n: int, k: int, cfg=(128, 128, 128, 8, 4), device="cpu", k_scaled=False) -> float:
    """:func:`fp8_accumulate`'s relative error against the same e4m3 operands multiplied in float64 (with
    ``k_scaled``, one scale per row and BLOCK_K block of K)."""
    g = torch.Generator(device=device).manual_seed(0)
    a8 = (torch.randn(m, k, device=device, generator=g) * 8).to(FP8)
    b8t = (torch.randn(n, k, device=device, generator=g) * 8).to(FP8)
    acc = torch.randn(m, n, device=device, generator=g)
    blocks = triton.cdiv(k, cfg[2])
    row_scale = torch.rand(m, blocks if k_scaled else 1, device=device, generator=g) + 0.5
    per_k = row_scale.double().repeat_interleave(cfg[2], dim=1)[:, :k] if k_scaled else row_scale.double()
    want = acc.double() + ((a8.double() * per_k) @ b8t.double().T) * 0.125
    fp8_accumulate(acc, a8, b8t, row_scale if k_scaled else row_scale[:, 0], 0.125, cfg)
    return ((acc.double() - want).norm() / want.norm()).item()


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in e4m3 (scale chosen so that |x| / scale <= FP8_MAX)."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _logits(e: torch.Tensor, c_piece: torch.Tensor) -> torch.Tensor:
    """e @ c_piece^T in fp32 from the 16-bit operands, as the GEMM path forms them."""
    out = torch.empty(e.shape[0], c_piece.shape[0], dtype=torch.float32, device=e.device)
    gemm_impl._logits_into(out, e, c_piece)
    return out


def fp8_softmax_de(e, c, t, lse, *, piece: int = 4096):
    """(dE in e's dtype with P C from e4m3 operands, P C in fp32 from the same operands, the exact P C in
    float64, the per-row error estimate): the mean loss, every target valid."""
    n, d = e.shape
    part = torch.zeros(n, d, dtype=torch.float32, device=e.device)
    exact = torch.zeros(n, d, dtype=torch.float64, device=e.device)
    est2 = torch.zeros(n, dtype=torch.float64, device=e.device)
    for start in range(0, c.shape[0], piece):
        cp = c[start:start + piece]
        p = torch.exp(_logits(e, cp) - lse[:, None])
        row_scale = p.amax(dim=1, keepdim=True).clamp_min(1e-30) / FP8_MAX
        c_scale = cp.float().abs().amax().clamp_min(1e-30) / FP8_MAX
        p8, c8 = _to_fp8(p, row_scale), _to_fp8(cp.float(), c_scale)
        # What an fp8 GEMM computes: exact products of the e4m3 values, accumulated in fp32, then scaled.
        part += (p8.float() @ c8.float()) * row_scale * c_scale
        exact += p.double() @ cp.double()
        est2 += (p.double() ** 2) @ (cp.double() ** 2).sum(dim=1)
    de = ((part - c[t].float()) / n).to(e.dtype)
    return de, part, exact, EST * est2.sqrt()


def accuracy(e, c, t, *, piece: int = 4096) -> dict:
    """The probe's accuracy figures for one set of inputs (see the module's docstring)."""
    n = e.shape[0]
    loss_ref, de_ref, _ = float64_reference(e, c, t)
    errs = {}
    for name, fn in (("lmforge", linear_cross_entropy), ("torch", torch_loss)):
        e1 = e.detach().clone().requires_grad_()
        fn(e1, c.detach(), t).backward()
        errs[name] = _rel(e1.grad, de_ref)
    with torch.no_grad():
        lse = torch.logsumexp(_logits(e, c), dim=1)
        de, part, exact, est = fp8_softmax_de(e, c, t, lse, piece=piece)
    bound = 1.5 * errs["torch"]
    room = math.sqrt(max(bound ** 2 - errs["lmforge"] ** 2, 0.0))
    row_norm = (de_ref * n).norm(dim=1)  # |dE_i| for the summed loss, as est is
    row_err = (part.double() - exact).norm(dim=1)
    ratio = est / row_err.clamp_min(1e-300)
    return dict(de_err_lmforge=errs["lmforge"], de_err_torch=errs["torch"], bound=bound, room=room,
                de_err_fp8=_rel(de, de_ref), softmax_share=(exact.norm() / (de_ref * n).norm()).item(),
                fp8_part_err=((part.double() - exact).norm() / exact.norm()).item(),
                est_over_err_median=ratio.median().item(), est_over_err_min=ratio.min().item(),
                rows_over_room=(est / row_norm > room).double().mean().item())


def timings(n_rows: int, piece: int, d: int) -> list:
    """One backward step's dE product: shipped (bf16, into fp32) against e4m3 (torch._scaled_mm), GPU ms."""
    from lmforge.cce.triton_impl import _accumulate_matmul

    g = torch.Generator(device="cuda").manual_seed(0)
    dz = torch.randn(n_rows, piece, device="cuda", generator=g).bfloat16()
    cp = torch.randn(piece, d, device="cuda", generator=g).bfloat16()
    acc = torch.zeros(n_rows, d, device="cuda")
    a8 = dz.to(FP8)
    b8t = cp.t().contiguous().to(FP8)  # (d, piece): its transpose is the column-major operand
    one = torch.ones((), device="cuda")
    flops = 2 * n_rows * piece * d
    rows = []

    def record(variant, fn):
        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=100)
            rows.append(dict(variant=variant, rows=n_rows, piece=piece, d=d, ms=ms, tflops=flops / ms / 1e9))
        except (RuntimeError, TypeError) as err:  # an fp8 path this torch or GPU lacks is reported
            rows.append(dict(variant=variant, error=f"{type(err).__name__}: {err}"[:300]))
        print(json.dumps(rows[-1]), flush=True)

    record("bf16_into_fp32 (shipped)", lambda: _accumulate_matmul(acc, dz, cp))
    record("fp8_fp32_out", lambda: torch._scaled_mm(a8, b8t.t(), scale_a=one, scale_b=one, out_dtype=torch.float32))
    record("fp8_fp32_out_then_add", lambda: acc.add_(torch._scaled_mm(a8, b8t.t(), scale_a=one, scale_b=one,
                                                                       out_dtype=torch.float32)))
    record("fp8_bf16_out", lambda: torch._scaled_mm(a8, b8t.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    row_ones = torch.ones(n_rows, 1, device="cuda")
    col_ones = torch.ones(1, d, device="cuda")
    record("fp8_rowwise_bf16_out_then_add", lambda: acc.add_(torch._scaled_mm(
        a8, b8t.t(), scale_a=row_ones, scale_b=col_ones, out_dtype=torch.bfloat16)))
    record("piece_to_fp8_transposed", lambda: cp.t().contiguous().to(FP8))
    cfgs = ((128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4), (256, 128, 128, 8, 3))
    for k_scaled in (False, True):
        for cfg in cfgs[:2] if k_scaled else cfgs:
            name = f"triton_fp8_accumulate{'_kscaled' if k_scaled else ''} {cfg}"
            row_scale = torch.ones(n_rows, triton.cdiv(piece, cfg[2]) if k_scaled else 1, device="cuda")
            row_scale = row_scale if k_scaled else row_scale[:, 0]
            try:
                err = kernel_error(1024, 512, 1024, cfg, device="cuda", k_scaled=k_scaled)
            except Exception as exc:  # a configuration this GPU cannot hold is reported
                rows.append(dict(variant=name, error=f"{type(exc).__name__}: {exc}"[:300]))
                print(json.dumps(rows[-1]), flush=True)
                continue
            record(f"{name} (rel err {err:.1e})",
                   lambda cfg=cfg, row_scale=row_scale: fp8_accumulate(acc, a8, b8t, row_scale, 1.0, cfg))
    return rows


def selftest() -> list:
    """Accuracy rows on the CPU at a small shape: a flat softmax (random inputs) and a peaked one."""
    out = []
    for name, sharpen in (("flat", 1.0), ("peaked", 12.0)):
        g = torch.Generator().manual_seed(0)
        n, d, v = 256, 64, 4096
        e = (torch.randn(n, d, generator=g) * sharpen / d ** 0.5).bfloat16()
        c = torch.randn(v, d, generator=g).bfloat16()
        t = torch.randint(0, v, (n,), generator=g)
        out.append(dict(case=name, **accuracy(e, c, t, piece=1024)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gemma2-2b")
    ap.add_argument("--regime", default="random")
    ap.add_argument("--real-path", default=".benchdata/real.safetensors")
    ap.add_argument("--piece", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=2816, help="rows of the timed backward step (a row chunk)")
    ap.add_argument("--acc-rows", type=int, default=0,
                    help="measure the accuracy on the first ACC_ROWS tokens only (the float64 products at the full "
                         "shape take minutes even on a GPU); 0: all")
    ap.add_argument("--out")
    args = ap.parse_args()
    n, d, v = parse_shape(args.shape)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    e, c, t = make_inputs(args.regime, n, d, v, dtype=torch.bfloat16, device=device, real_path=args.real_path)
    result = dict(shape=args.shape, regime=args.regime, device=str(torch.cuda.get_device_name(0)
                                                                   if device.type == "cuda" else "cpu"),
                  torch=torch.__version__, acc_rows=args.acc_rows or n,
                  accuracy=accuracy(*((e[:args.acc_rows], c, t[:args.acc_rows]) if args.acc_rows else (e, c, t)),
                                    piece=args.piece))
    print(json.dumps(result["accuracy"]), flush=True)
    if device.type == "cuda":
        result["timings"] = timings(args.rows, args.piece, d)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

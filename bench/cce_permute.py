"""Time ``gemm_impl.permute_rows_`` (the dC workspace's closing un-permutation) by the size of its batch buffer.

The dC workspace (the default since v3.14; ``LMFORGE_CCE_DC_WORKSPACE=0`` turns it off; route (e) of
docs/cce-tuning.md) forms dC in the sorted vocabulary order and moves its rows home in place, in batches that pass
through the backward's dz buffer (32 MiB at Gemma 2's shape on Hopper, 64 with cuBLAS's fp32 slabs). Each batch is
gathered into the buffer and scattered out of it, so every row crosses memory twice; batches that fit the L2 cache
were expected to be cheaper, and were not (docs/cce-tuning.md: the launches dominate). This times the move of a (V x
D) bf16 matrix under a random permutation for buffers of several sizes, beside the out-of-place floor
(``index_copy_`` into a second matrix: each byte read and written once), and checks each result against it: ``ms``
as the backward ran it until v3.13.1 (plan and moves at the end), ``gpu_ms`` the same behind a busy GPU (the host's
planning launches hidden), ``planned_ms`` the moves alone (``plan_row_moves`` done ahead), ``plan_gpu_ms`` the plan
alone behind a busy GPU (what the backward's queue pays for it before its host sync).

    python bench/cce_permute.py --out bench/results/cce_permute.json                 # GPU, ~1 min
    TRITON_INTERPRET=1 python bench/cce_permute.py --shape 2048x64 --buffers 0.0625 0.25 --device cpu  # smoke
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from lmforge.cce import gemm_impl  # noqa: E402
from lmforge.cce.benchmark import _time_ms  # noqa: E402

SHAPES = {"gemma2-2b-dc": (256000, 2304), "llama3-8b-dc": (128256, 4096), "gemma2-2b-de": (8192, 2304)}


def timed(fn, repeats: int, device: str, *, busy: bool = False) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs after one warm-up; on a GPU by CUDA events, and with
    ``busy`` behind a spinning GPU, so that the host's launches are hidden (the GPU's time alone)."""
    return _time_ms(fn, torch.device(device), 1, repeats, busy_cycles=int(5e7) if busy and device == "cuda" else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=list(SHAPES), help="names of SHAPES or VxD")
    ap.add_argument("--buffers", nargs="+", type=float, default=[4, 8, 16, 32, 64, 128], help="buffer sizes, MiB")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows_out = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name in args.shape:
        v, d = SHAPES[name] if name in SHAPES else map(int, name.split("x"))
        perm = torch.randperm(v, generator=gen).to(args.device)
        x0 = torch.randn(v, d, generator=gen).to(device=args.device, dtype=torch.bfloat16)
        expect = torch.empty_like(x0).index_copy_(0, perm, x0)
        out = torch.empty_like(x0)
        floor = timed(lambda: out.index_copy_(0, perm, x0), args.repeats, args.device)
        gib = 2 * x0.numel() * x0.element_size() / 2**30  # read once, written once
        row = dict(shape=name, rows=v, cols=d, mib=x0.numel() * x0.element_size() / 2**20,
                   out_of_place_ms=floor, out_of_place_gbs=gib / floor * 1e3, buffers={})
        x = x0.clone()
        for mb in args.buffers:
            b = max(1, int(mb * 2**20) // (d * x0.element_size()))
            buffer = torch.empty((b, d), dtype=x0.dtype, device=args.device)
            x.copy_(x0)
            gemm_impl.permute_rows_(x, perm, buffer)
            if not torch.equal(x, expect):
                raise SystemExit(f"permute_rows_ moved rows wrongly at {name} with a {mb} MiB buffer")
            ms = timed(lambda: gemm_impl.permute_rows_(x, perm, buffer), args.repeats, args.device)
            gpu_ms = timed(lambda: gemm_impl.permute_rows_(x, perm, buffer), args.repeats, args.device, busy=True)
            moves = gemm_impl.plan_row_moves(perm, b)
            x.copy_(x0)
            if not torch.equal(gemm_impl.permute_rows_(x, None, buffer, moves), expect):
                raise SystemExit(f"planned moves went wrong at {name} with a {mb} MiB buffer")
            planned_ms = timed(lambda: gemm_impl.permute_rows_(x, None, buffer, moves), args.repeats, args.device)
            plan_gpu_ms = timed(lambda: gemm_impl.plan_row_moves(perm, b), args.repeats, args.device, busy=True)
            row["buffers"][str(mb)] = dict(batch_rows=b, ms=ms, vs_out_of_place=ms / floor, gpu_ms=gpu_ms,
                                           planned_ms=planned_ms, plan_gpu_ms=plan_gpu_ms)
        print(json.dumps(row))
        rows_out.append(row)
    if args.out:
        meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__)
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows_out), indent=1))


if __name__ == "__main__":
    main()

"""How the training forward's time depends on the compact slab table's group size (GPU time alone).

The filtered backward needs each row's softmax mass per slab of the sorted vocabulary. Since v3.13 the Hopper
forward keeps it as a :class:`lmforge.cce.gemm_impl.SlabTable`: one program per (row block, group of slabs)
walks the group's slabs in order and stores a uint8 code per (slab, row), so 256 long programs run at Gemma 2's
shape where v3.12 ran 4032 short ones (one per slab) that wrote a float32 per (slab, row). The sixteenth
session's profiles put v3.13's training forward kernel at 17.2 ms against v3.12's 15.7 (H100, Gemma calibrated,
same tiles). This probe times :func:`gemm_impl.forward_stats` on random inputs (the forward does the same work
whatever the data) with:

* ``gN``: a SlabTable of N slabs per group (the shipped choice is ``gemm_impl.slabs_per_group``);
* ``f32``: v3.12's float32 (slabs, N) table, one program per (row block, slab);
* ``eval``: no permutation and no table (the forward outside training).

Variants run interleaved, ``--rounds`` times, each timed behind a busy GPU. Printed per variant: median ms,
programs in the grid, and the table's bytes. Every variant's lse is checked against ``f32``'s, and every
SlabTable's decoded bounds against ``f32``'s exact slab log-sum-exps (a bound may never be below).

    TRITON_INTERPRET=1 LMFORGE_CCE_TMA=1 python bench/cce_forward_groups.py --selftest     # CPU, tiny shape
    python bench/cce_forward_groups.py --shapes gemma2-2b llama3-8b --groups 16 8 4 2 --out groups.json
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

if "--selftest" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LMFORGE_CCE_TMA", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from lmforge.cce import gemm_impl, order  # noqa: E402
from lmforge.cce.benchmark import GPU_SHAPES, cuda_event_times  # noqa: E402


def inputs(n: int, d: int, v: int, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    e = (torch.randn(n, d, generator=gen) * 0.5).to(device=device, dtype=torch.bfloat16)
    c = (torch.randn(v, d, generator=gen) * 0.05).to(device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return e, c, targets


def variants(e, c, groups, slab_bytes):
    """name -> (table factory or None, uses the permutation)."""
    n, v = e.shape[0], c.shape[0]
    n_slab = gemm_impl.n_slabs(n, v, slab_bytes)
    out = {"eval": (None, False),
           "f32": (lambda: torch.empty((n_slab, n), dtype=torch.float32, device=e.device), True)}
    for g in groups:
        if g <= n_slab:
            out[f"g{g}"] = (lambda g=g: gemm_impl.SlabTable(
                torch.empty((-(-n_slab // g), n), dtype=torch.float32, device=e.device),
                torch.empty((n_slab, n), dtype=torch.uint8, device=e.device), g), True)
    return out


def table_bytes(table) -> int:
    if table is None:
        return 0
    if isinstance(table, gemm_impl.SlabTable):
        return table.lse.numel() * 4 + table.codes.numel()
    return table.numel() * 4


def programs(e, c, table, slab_bytes) -> int:
    """Programs in the forward kernel's grid: (row blocks) x (groups), or x (slabs x splits per slab)."""
    n_blocks, *_, n_parts = gemm_impl.tma_grid(e, c, gemm_impl.slab_columns(e.shape[0], c.shape[0], slab_bytes),
                                               table)
    return n_blocks * n_parts


def training_peaks(e, c, targets, table_of, slab_bytes) -> dict:
    """MiB the training forward allocates at its peak beyond its inputs, per variant: the sorted order, the
    table and the forward's statistics, made afresh as autograd makes them (the benchmark's forward extra
    memory also counts autograd's own small buffers)."""
    n, v = e.shape[0], c.shape[0]
    peaks = {}
    for key, (make, sorted_order) in table_of.items():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        perm = order.vocab_order(e, c, None, gemm_impl.slab_columns(n, v, slab_bytes)) if sorted_order else None
        table = make() if make is not None else None
        stats = gemm_impl.forward_stats(e, c, None, targets, perm=perm, slab_lse=table, slab_bytes=slab_bytes)
        torch.cuda.synchronize()
        peaks[key] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del perm, table, stats
    return peaks


def run_shape(name, n, d, v, groups, rounds, device, slab_bytes=None):
    e, c, targets = inputs(n, d, v, device)
    perm = order.vocab_order(e, c, None, gemm_impl.slab_columns(n, v, slab_bytes))
    table_of = variants(e, c, groups, slab_bytes)
    results, tables, lses = {}, {}, {}
    for key, (make, sorted_order) in table_of.items():
        tables[key] = make() if make is not None else None

        def call(key=key, sorted_order=sorted_order):
            return gemm_impl.forward_stats(e, c, None, targets, perm=perm if sorted_order else None,
                                           slab_lse=tables[key], slab_bytes=slab_bytes)
        lses[key] = call()[0].clone()
        results[key] = dict(fn=call, ms=[], programs=programs(e, c, tables[key], slab_bytes),
                            table_bytes=table_bytes(tables[key]))
    for _ in range(rounds):
        for key, r in results.items():
            if device == "cuda":
                r["ms"] += cuda_event_times(r["fn"], 3, busy_cycles=int(3e7))
            else:
                r["fn"]()
    exact = tables["f32"]
    peaks = training_peaks(e, c, targets, table_of, slab_bytes) if device == "cuda" else {}
    rows = []
    for key, r in results.items():
        row = dict(shape=name, variant=key, programs=r["programs"], table_bytes=r["table_bytes"],
                   lse_max_diff=float((lses[key] - lses["f32"]).abs().max()))
        if r["ms"]:
            row["ms"] = statistics.median(r["ms"])
            row["ms_min"], row["ms_max"] = min(r["ms"]), max(r["ms"])
        if key in peaks:
            row["training_forward_peak_mib"] = peaks[key]
        if isinstance(tables[key], gemm_impl.SlabTable):
            # a bound below the exact slab log-sum-exp would let the backward drop mass it must keep
            row["bound_min_margin"] = float((tables[key].bounds() - exact).min())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def selftest() -> list[dict]:
    """The variants on a tiny shape on the CPU (Triton interpreter, LMFORGE_CCE_TMA=1): 3 slabs of 40 columns
    (several tiles, a partial last one) and a last slab of 24; groups of 2 leave a short last group."""
    return run_shape("selftest", 64, 64, 104, [2, 1], 1, "cpu", slab_bytes=64 * 40 * 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["gemma2-2b"], choices=list(GPU_SHAPES))
    ap.add_argument("--groups", nargs="+", type=int, default=[16, 8, 4, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--selftest", action="store_true", help="tiny shape under the Triton interpreter (CPU)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.selftest:
        bad = [r for r in selftest() if r["lse_max_diff"] > 1e-4 or r.get("bound_min_margin", 0.0) < -1e-4]
        if bad:
            raise SystemExit(f"selftest failed: {bad}")
        print("selftest ok")
        return
    rows = []
    for name in args.shapes:
        n, d, v = GPU_SHAPES[name]
        rows += run_shape(name, n, d, v, args.groups, args.rounds, "cuda")
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                                  rows=rows), indent=1))


if __name__ == "__main__":
    main()

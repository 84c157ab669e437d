"""The GEMM path of Cut Cross-Entropy: cuBLAS logit slabs, Triton passes over them (impl="gemm").

Same contract as :mod:`lmforge.cce.chunked` and :mod:`lmforge.cce.triton_impl`. The vocabulary is cut into
slabs of S columns; for each slab cuBLAS writes the float32 logits Z = E C[slab]^T (N x S, bf16 x bf16
products accumulated and stored in fp32), and a memory-bound Triton pass reads them once:

* forward: fold Z into running per-row statistics (:func:`slab_stats_kernel`);
* backward: recompute Z, turn it into dz in place (:func:`slab_grad_kernel`), then dC[slab] = dz^T E
  (complete in one product, rounded once) and dE += dz C[slab] (fp32 accumulator).

On Hopper (sm_90+) with 16-bit inputs no fp32 slab is written (:func:`tma_applies`): in the forward one
Triton kernel fed by tensor descriptors (TMA) computes the products and folds them into the statistics on
chip, at ~726 TFLOP/s on the H200 against ~590 for cuBLAS slabs plus their pass
(:mod:`lmforge.cce.kernels.tma_forward`; it writes the same per-slab table); in the backward a kernel of the
same structure stores each slab's dz in the inputs' dtype (:mod:`lmforge.cce.kernels.tma_grad`; half the
workspace), and cuBLAS forms dC and dE from it as before.

Why a second GPU path: the fused Triton kernels never hold a slab (forward extra memory is a few
vectors), but on the H200 their backward reaches about half of the tensor cores' rate, while cuBLAS
reaches most of it. Here the price is one slab of workspace (``slab_bytes``, default 128 MiB, fp32) plus
the fp32 dE accumulator. Logits are fp32 end to end, so accuracy is that of the chunked float32 path up to
dz's rounding to the input dtype.

Gradient filtering (``filter_eps``): a dense GEMM cannot skip tiles, but it can skip rows. The forward
visits the vocabulary in slabs by mean logit (:func:`lmforge.cce.order.vocab_order`) and stores every
row's log-sum-exp over each slab (a :class:`SlabTable`: about a byte per row and slab, an upper bound to
1/16 nat), so the backward knows each row's softmax mass per slab without recomputing anything. Each row
drops its longest run of trailing slabs whose summed mass stays <= filter_eps (:func:`row_depths`); with
rows ordered by how many slabs they keep, each slab's three products run over a leading block of rows, at
the dense products' rate and with no gathers. On SmolLM2's real activations (8192 tokens, 4096-column
slabs, filter_eps 2^-12) rows keep 47% of (slab, row) pairs (72% without the sort).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

from lmforge.cce import configs, order
from lmforge.cce.triton_impl import (HAS_TRITON, _accumulate_matmul, _launch_kwargs, _num_sms, combine_splits,
                                     interpreting)

if HAS_TRITON:
    import triton

    from lmforge.cce.kernels.slab import (cycle_heads_kernel, cycle_list_kernel, cycle_round_kernel,
                                          scatter_rows_kernel, slab_grad_kernel, slab_stats_kernel)

    try:  # tensor descriptors (TMA on Hopper): Triton 3.4+
        from triton.tools.tensor_descriptor import TensorDescriptor

        from lmforge.cce.kernels.fp8 import E4M3_MAX, fp8_accumulate_kernel, fp8_transpose_kernel
        from lmforge.cce.kernels.tma_forward import lse_tma_kernel
        from lmforge.cce.kernels.tma_grad import logit_grad_tma_kernel
    except ImportError:  # pragma: no cover - older Triton: the forward keeps cuBLAS slabs
        TensorDescriptor = None

DEFAULT_SLAB_BYTES = 128 << 20
# Gradient filtering runs only from this hidden size up: below it the slab products are so cheap that the
# sort, the per-slab log-sum-exp table and the gathered classifier slabs cost more than the skipped work
# (H200, SmolLM2's real data, D = 576, rows in depth order (v3.4): 5.32 ms forward+backward exact, 8.64
# filtered at 2^-12, 10.1 at 2^-10; bench/cce_filter_sweep.py --filter-min-d 1).
FILTER_MIN_D = 1024
# When rows keep at least this share of (slab, row) pairs, the backward runs exact over the vocabulary in
# its own order: the sorted order's costs (a gathered classifier slab per slab, dC scattered back row by
# row, the rows' permutation) are then larger than the few products saved (H200, Gemma's random inputs,
# which keep every slab: 71.7 ms forward+backward through the sorted order, 67.3 exact).
DENSE_SHARE = 0.9
# After a filtered backward ran exact that way, the next DENSE_SKIP forwards of the same problem (vocabulary,
# hidden size, dtype, device, filter_eps) skip the sorted order and its table: their backward is exact in
# vocabulary order, what the fallback would run, without the forward's gathered classifier rows and sort.
# Then one step filters again, to notice a softmax that has sharpened (training's first steps are as flat
# as random inputs); each consecutive fallback doubles the skip, up to DENSE_SKIP_MAX steps.
DENSE_SKIP, DENSE_SKIP_MAX = 4, 64
_dense_history: dict[tuple, list[int]] = {}  # problem -> [forwards still to skip, the current skip length]


def _problem_key(e: torch.Tensor, c: torch.Tensor, filter_eps: float) -> tuple:
    return c.shape[0], c.shape[1], e.dtype, str(e.device), float(filter_eps)


def sorted_order_due(e: torch.Tensor, c: torch.Tensor, filter_eps: float) -> bool:
    """Whether this filtered forward should visit the vocabulary in sorted order (see DENSE_SKIP); a forward
    told no counts as one of the skipped steps."""
    state = _dense_history.get(_problem_key(e, c, filter_eps))
    if state is None or state[0] <= 0:
        return True
    state[0] -= 1
    return False


def _note_backward(e: torch.Tensor, c: torch.Tensor, filter_eps: float, dense: bool) -> None:
    """Record whether a filtered backward fell back to exact (``dense``) for :func:`sorted_order_due`."""
    key = _problem_key(e, c, filter_eps)
    if not dense:
        _dense_history.pop(key, None)
        return
    previous = _dense_history.get(key)
    skip = DENSE_SKIP if previous is None else min(2 * previous[1], DENSE_SKIP_MAX)
    _dense_history[key] = [skip, skip]


def reset_filter_history() -> None:
    """Forget every fallback :func:`sorted_order_due` remembers (the next filtered forward sorts) and every
    problem the e4m3 dE path gave up on (:func:`fp8_de_applies`)."""
    _dense_history.clear()
    _fp8_refused.clear()


# The presets ("auto", "fast") filter only where slabs are at most this wide: 4096 columns (8192+ tokens with
# the default 128 MiB slab) is where filtering was measured to pay on the H200. With fewer tokens the slabs
# widen, so a row skips less (coarser slabs) while the sorted order's gathered classifier slab grows (cols x
# D x 2 bytes: 96 MiB for 1536 tokens at D = 2304); that regime is not measured, so the presets stay exact
# there (an explicit filter_eps still filters).
FILTER_MAX_COLS = 4096


def presets_filter(n: int, vocab: int, slab_bytes: int | None = None) -> bool:
    """Whether filter_eps "auto" / "fast" filter the GEMM path for n tokens (see FILTER_MAX_COLS)."""
    return slab_columns(n, vocab, slab_bytes) <= FILTER_MAX_COLS


def filters(d: int) -> bool:
    """Whether the GEMM path filters gradients at hidden size ``d`` (see FILTER_MIN_D)."""
    return d >= FILTER_MIN_D


def slab_columns(n: int, vocab: int, slab_bytes: int | None = None) -> int:
    """Columns per slab: the fp32 (n x S) logit slab fits ``slab_bytes`` (LMFORGE_CCE_SLAB_MB overrides),
    S a multiple of 128 (whole tensor-core tiles for cuBLAS) unless the budget or the vocabulary is smaller."""
    if slab_bytes is None:
        slab_bytes = int(float(os.environ.get("LMFORGE_CCE_SLAB_MB", DEFAULT_SLAB_BYTES / 2**20)) * 2**20)
    cols = slab_bytes // (4 * max(n, 1))
    cols = cols // 128 * 128 if cols >= 128 else max(16, cols)
    return min(cols, vocab)


def _blocks(device: torch.device, kernel: str) -> dict:
    """Rows per program, columns per step and warps of the slab kernels ("stats" or "grad"), from
    :func:`lmforge.cce.configs.config_for`. Shipped defaults, H200, one 8192 x 4096 fp32 slab
    (bench/cce_slab_tune.py, 36 shapes): stats 52.8 us with 4 x 1024 and 4 warps (8 x 512: 56.6), the
    in-place gradient 58.3 us with 8 x 1024 and 8 warps (8 x 512, 4 warps: 65.9); pipeline stages made no
    difference.
    """
    return configs.config_for(kernel, None, device)


def _launch(cfg: dict) -> dict:
    return {} if interpreting() else {"num_warps": cfg["num_warps"]}


_FP32_OUT_MM: dict = {}


def _logits_into(out: torch.Tensor, e: torch.Tensor, c_slab: torch.Tensor) -> None:
    """out (n x S, float32) = e @ c_slab^T, the products of 16-bit inputs stored in fp32 without rounding.

    cuBLAS writes fp32 output from bf16/fp16 operands (torch's mm with out_dtype); where that is missing
    (the CPU, older torch) the operands are upcast.
    """
    if e.dtype == out.dtype:
        torch.mm(e, c_slab.t(), out=out)
        return
    key = (out.device.type, e.dtype)
    if _FP32_OUT_MM.get(key, e.is_cuda):
        try:
            torch.mm(e, c_slab.t(), out_dtype=torch.float32, out=out)
            _FP32_OUT_MM[key] = True
            return
        except (TypeError, RuntimeError):  # no out_dtype overload in this torch / for this device
            _FP32_OUT_MM[key] = False
    torch.mm(e.float(), c_slab.float().t(), out=out)


# The backward's workspace, beyond dE and dC themselves: the fp32 dE accumulator of the rows in hand, the
# logit-gradient buffer (dz, or cuBLAS's fp32 logits), and in the sorted order the gathered classifier piece
# and (only where dE is not wanted in e's dtype) the chunk's rows in depth order: otherwise those rows are
# gathered into the chunk's own rows of dE, which stays in depth order until the end. In the vocabulary
# order the workspace stays within BWD_SHARE of the gradients' own bytes (dE + dC), or BWD_MIN_BYTES where
# that is more (small problems are not cut into many tiny products): at Gemma 2 2B's shape a whole slab's
# workspace was 100 MiB (9% of dE + dC), two row chunks of half slabs take 52 MiB for 1.7 ms more per
# forward+backward (H200, 65.1 against 63.4 ms; the target is 5%).
BWD_SHARE = 0.045
BWD_MIN_BYTES = 48 << 20
# Problems whose dE + dC take less than SMALL_GRAD_BYTES keep one chunk of whole slabs by default: their
# whole workspace is tens of MiB, and cutting it costs launches where the host already bounds the step
# (SmolLM2, 8192 x 576 x 49152, H200 call 5 of 2026-11-30, fwd+bwd ms: real 4.05 / exact 3.81 with one
# chunk against 4.31 / 4.30 with two, random 3.73 / 3.76 against 4.12 / 4.16; 136 against 104 MiB).
SMALL_GRAD_BYTES = 256 << 20
# The sorted order (gradient filtering) runs fewer rows per slab, so its products are smaller and cutting
# them further leaves the GPU waiting for the host (120-150 us of host work per step of five launches, the
# Triton dz launch 34-40 us of it) and shrinks the products below a wave of tiles. Gemma 2 2B, calibrated
# data, filter "auto", forced plans since the chunk's rows live in dE's rows (fwd+bwd ms / summed kernel ms /
# peak MiB; H100, 2026-12-07, docs/cce-tuning.md v3.9): two chunks of whole slabs 42.2-44.7 / 38.3 / 1250;
# three chunks 46.1 / 40.0 / 1229; four chunks 58.0 / 45.0 / 1216 (torch.compile 45.4 ms in the same call);
# two chunks of half slabs 58.3 / 41.6 / 1225. So by default the sorted order takes SORTED_CHUNKS row chunks
# of whole slabs whatever the budget (LMFORGE_CCE_BWD_MB, when set, applies to it too: 52 gives four chunks).
SORTED_CHUNKS = 2
# Every row chunk after the first adds one bf16 rounding of a partial dC: with a near-uniform softmax (the
# filter then keeps every row, so the backward runs in vocabulary order) k equal chunks multiply that rounding
# part of dC's error by about sqrt((k + 1) / 2), but the logit gradient's own bf16 rounding (which torch has
# too) dominates dC's error. Gemma 2 2B, random data, H100 2026-12-07 (bench/cce_backward_plans.py --errors):
# dC error 8.21e-4 with two chunks, 8.35e-4 with three, torch 7.7e-4; fitted, four chunks ~8.5e-4 (1.10x torch)
# and eight ~9.0e-4 (1.17x), against the bound of 1.5x. So the vocabulary order uses at most
# EXACT_MAX_CHUNKS chunks where the budget allows, a margin rather than a binding limit: the cost model's
# own choice takes three at Gemma's shape (whole slabs: 64.7 against 66.0 ms for two chunks of half slabs,
# 46.75 against 52 MiB) and four at Llama 3 8B's and Qwen2.5 7B's. The sorted order (peaked softmax, dC's
# error dominated by the products) is not capped.
EXACT_MAX_CHUNKS = 4
# The e4m3 dE product's target rows are added per sub-chunk of this many rows (fp32 temporaries).
FP8_TARGET_ROWS = 256
# The e4m3 product's error per row is modelled as FP8_EST sqrt(sum_v q_v^2 |C_v|^2) (independent roundings
# of both operands: e4m3's 2^-4 relative step, 2^-4 / sqrt(3) in rms per operand, sqrt(2) for the two; the
# model ran 0.95-2.8x the measured row errors in bench/cce_fp8_probe.py). Rows whose estimate exceeds
# FP8_ROW_ROOM of their dE's norm are recomputed exactly: with torch's bf16 error ~1.7e-3 the e4m3 part then
# adds at most ~1e-3 in quadrature, inside the 1.5x bound. When more than FP8_REFUSE_SHARE of the rows need
# that, the problem (vocabulary, hidden size, dtype, device) stops taking the e4m3 path until
# reset_filter_history(): its softmax is too peaked for it.
FP8_EST = math.sqrt(2) * 2.0 ** -4 / math.sqrt(3)
FP8_ROW_ROOM = 1e-3
FP8_REFUSE_SHARE = 0.02
_fp8_refused: set[tuple] = set()
# backward_plan's price of one more (row chunk, slab piece) step, in bytes of memory traffic: ~7 launches at
# ~40 us of host work each, ~1.3 GB at the H200's ~4.8 TB/s, against products that shrink with the step.
STEP_BYTES = 1 << 30


def backward_budget() -> int | None:
    """Bytes the GEMM backward's workspace may take (``LMFORGE_CCE_BWD_MB``), or ``None`` where that is unset:
    then small problems (SMALL_GRAD_BYTES) take one chunk of whole slabs, the sorted order SORTED_CHUNKS
    chunks of whole slabs, and the vocabulary order :func:`default_budget`."""
    mb = os.environ.get("LMFORGE_CCE_BWD_MB")
    if mb is None:
        return None
    try:
        budget = int(float(mb) * 2**20)
    except ValueError:
        raise ValueError(f"LMFORGE_CCE_BWD_MB must be a number of MiB, got {mb!r}") from None
    if budget <= 0:
        raise ValueError(f"LMFORGE_CCE_BWD_MB must be > 0, got {mb!r}")
    return budget


def default_budget(n: int, d: int, vocab: int, elem_bytes: int) -> int:
    """The vocabulary order's default workspace budget: BWD_SHARE of dE + dC, at least BWD_MIN_BYTES."""
    return max(int(BWD_SHARE * (n + vocab) * d * elem_bytes), BWD_MIN_BYTES)


def _share(total: int, parts: int, unit: int) -> int:
    """total / parts rounded up to a multiple of ``unit``, at most ``total``."""
    return min(total, -(-(-(-total // parts)) // unit) * unit)


def _row_unit(n: int) -> int:
    """Rows of a chunk come in whole 128-row tiles, 8 rows below 512 rows."""
    return 128 if n >= 512 else 8


def sorted_rows(n: int) -> int:
    """Rows per chunk of the sorted order's default: n / SORTED_CHUNKS, in whole row units (:func:`_row_unit`)."""
    return _share(n, SORTED_CHUNKS, _row_unit(n))


def backward_workspace(rows: int, piece: int, d: int, *, elem_bytes: int, dz_bytes: int, gather_rows: bool,
                       gather_cols: bool, de_acc: bool, fp8: bool = False) -> int:
    """Bytes of :func:`backward`'s workspace for chunks of ``rows`` rows and slab pieces of ``piece`` columns:
    the logit-gradient buffer (``dz_bytes`` per entry), the fp32 dE accumulator (``de_acc``), the rows in
    depth order (``gather_rows``), the gathered classifier piece (``gather_cols``) and, for the e4m3 dE
    product (``fp8``), the softmax part's e4m3 copy with a scale per row and tile (at most one per 16
    columns), the piece's e4m3 transpose and the target rows' sub-chunk (FP8_TARGET_ROWS rows, fp32); not
    counted there, its two fp32 vectors (the rows' error sums and the classifier rows' squared norms)."""
    return (rows * piece * dz_bytes + (rows * d * 4 if de_acc else 0)
            + (rows * d * elem_bytes if gather_rows else 0) + (piece * d * elem_bytes if gather_cols else 0)
            + (rows * piece + rows * -(-piece // 16) * 4 + piece * d + FP8_TARGET_ROWS * d * 8 if fp8 else 0))


@functools.lru_cache(maxsize=256)
def backward_plan(n: int, d: int, vocab: int, cols_per_slab: int, *, elem_bytes: int, dz_bytes: int,
                  gather_rows: bool, gather_cols: bool, de_acc: bool, budget: int,
                  max_chunks: int | None = None, fp8: bool = False) -> tuple[int, int]:
    """(rows per chunk, columns per piece) for :func:`backward`: the cheapest split into at most
    ``max_chunks`` row chunks whose :func:`backward_workspace` fits ``budget`` (else the cheapest that fits
    with more chunks; the smallest workspace if none does).

    The backward runs over row chunks (outer) and, within each, over the slabs in pieces. Whole slabs and all
    rows in one chunk are cheapest; the price, in bytes of memory traffic plus STEP_BYTES per step: every
    product adds into the chunk's fp32 dE accumulator (read and written: narrow pieces cost more), and every
    chunk after the first reads the classifier again and adds its partial dC into dC (read and written: one
    more bf16 rounding of dC per chunk, so few chunks are also the more exact). Rows come in multiples of
    128 (whole tiles) and pieces of 256 columns, where the problem is that large.
    """
    row_unit = _row_unit(n)
    col_unit = 256 if cols_per_slab >= 1024 else 16
    n_slab = -(-vocab // cols_per_slab)
    classifier = vocab * d * elem_bytes * (2 if gather_cols else 1)  # read (and gathered) once per chunk
    fits, smallest = None, None
    seen = set()
    for chunks in range(1, -(-n // row_unit) + 1):
        rows = _share(n, chunks, row_unit)
        if rows in seen:
            continue
        seen.add(rows)
        n_chunks = -(-n // rows)
        for parts in range(1, -(-cols_per_slab // col_unit) + 1):
            piece = _share(cols_per_slab, parts, col_unit)
            n_parts = -(-cols_per_slab // piece)
            if parts > 1 and n_parts != parts:
                continue  # the same piece width as fewer parts
            steps = n_chunks * n_slab * n_parts
            # dE's rows read and written per step: the fp32 accumulator, or dE itself (16-bit) on the e4m3 path
            cost = (steps * (STEP_BYTES + (rows * d * 8 if de_acc else rows * d * 2 * elem_bytes if fp8 else 0))
                    + n_chunks * 2 * classifier + (n_chunks - 1) * 2 * classifier)
            space = backward_workspace(rows, piece, d, elem_bytes=elem_bytes, dz_bytes=dz_bytes,
                                       gather_rows=gather_rows, gather_cols=gather_cols, de_acc=de_acc, fp8=fp8)
            over = max_chunks is not None and n_chunks > max_chunks
            if space <= budget and (fits is None or (over, cost, steps) < fits[0]):
                fits = ((over, cost, steps), rows, piece)
            if smallest is None or space < smallest[0]:
                smallest = (space, rows, piece)
            if space <= budget:
                break  # more parts cost more steps and fit no better
    return (fits[1], fits[2]) if fits is not None else (smallest[1], smallest[2])


# scatter_rows_kernel's tile: 16 rows x 256 columns of 16-bit values (8 KiB read and written per program).
SCATTER_ROWS, SCATTER_COLS = 16, 256


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, add: bool,
                 side: torch.Tensor | None = None, side_index: torch.Tensor | None = None) -> None:
    """dst[index[i]] = src[i] (``add``: +=, in fp32, rounded once) for distinct ``index`` (int32 or int64;
    rows with a negative index are skipped): :func:`scatter_rows_kernel`, one launch, no atomics. ``side``:
    in the same launch also side[side_index[i]] = src[i] where side_index[i] >= 0 (not with ``add``)."""
    n_rows, d = src.shape
    if n_rows == 0:
        return
    has_side = side is not None
    if has_side and add:
        raise ValueError("scatter_rows: a side destination only for copies (add=False)")
    grid = (-(-n_rows // SCATTER_ROWS), -(-d // SCATTER_COLS))
    scatter_rows_kernel[grid](src, dst, index, n_rows, d, src.stride(0), dst.stride(0),
                              side if has_side else dst, side_index if has_side else index,
                              side.stride(0) if has_side else 0, ADD=add,
                              ROUND_BF16=interpreting() and dst.dtype == torch.bfloat16, HAS_SIDE=has_side,
                              BLOCK_R=SCATTER_ROWS, BLOCK_D=SCATTER_COLS, **_launch({"num_warps": 4}))


# cycle_round_kernel's positions per program
CYCLE_BLOCK = 1024


def _kernel_moves(perm: torch.Tensor, kernel: bool | None) -> bool:
    """Whether the permutation's cycles and move list come from the Triton kernels (``kernel=None``: where
    Triton runs: on a GPU, or under TRITON_INTERPRET=1) or from torch."""
    return kernel if kernel is not None else HAS_TRITON and (perm.is_cuda or interpreting())


def _jump_rounds(perm: torch.Tensor):
    """(leader, moves to it, three free int32 (V,) tensors) of every position under p -> perm[p], by
    ceil(log2 V) launches of :func:`cycle_round_kernel` (int32 throughout; perm itself is not written)."""
    v = perm.numel()
    state = [perm.to(torch.int32, copy=True), torch.arange(v, dtype=torch.int32, device=perm.device),
             torch.zeros(v, dtype=torch.int32, device=perm.device)]
    spare = [torch.empty_like(t) for t in state]
    grid = (triton.cdiv(v, CYCLE_BLOCK),)
    for r in range(max(1, (v - 1).bit_length())):
        cycle_round_kernel[grid](*state, *spare, v, 1 << r, BLOCK=CYCLE_BLOCK, **_launch({"num_warps": 4}))
        state, spare = spare, state
    return state[1], state[2], tuple(spare)


def _cycle_tables(perm: torch.Tensor, kernel: bool | None = None):
    """(leader, rank, length, head) of every position p under the moves p -> perm[p], each (V,): the smallest
    position of p's cycle, p's number of moves from it, the cycle's length, and that length at the leader
    (0 elsewhere: their running sum starts each cycle's list). Pointer jumping on the device, ceil(log2 V)
    rounds, no host sync: each round doubles a window of moves from p, keeping the window's smallest position
    and the moves to its first occurrence. Once the window covers the cycle, that is the leader and the moves
    from p to it, L - rank; the leader's successor is L - 1 moves from it. Where Triton runs (``kernel``, see
    :func:`_kernel_moves`): :func:`cycle_round_kernel` once a round, then :func:`cycle_heads_kernel` (int32);
    else the same in torch, seven launches a round (int64)."""
    v = perm.numel()
    if _kernel_moves(perm, kernel) and v:
        leader, off, (head, rank, length) = _jump_rounds(perm)
        cycle_heads_kernel[(triton.cdiv(v, CYCLE_BLOCK),)](perm.contiguous(), leader, off, head, rank, length, v,
                                                             BLOCK=CYCLE_BLOCK, **_launch({"num_warps": 4}))
        return leader, rank, length, head
    jump, leader = perm.long(), torch.arange(v, device=perm.device)
    off = torch.zeros(v, dtype=torch.long, device=perm.device)
    for r in range(max(1, (v - 1).bit_length())):
        low_j, off_j = leader[jump], off[jump]
        later = low_j < leader
        leader, off = torch.where(later, low_j, leader), torch.where(later, off_j + (1 << r), off)
        jump = jump[jump]
    length = off[perm.long()[leader]] + 1
    rank = torch.where(off == 0, 0, length - off)
    return leader, rank, length, torch.where(off == 0, length, 0)


def _cycles(perm: torch.Tensor, *, kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(leader, rank, length) of :func:`_cycle_tables`, int64."""
    return tuple(t.long() for t in _cycle_tables(perm, kernel)[:3])


class RowMoves(NamedTuple):
    """:func:`permute_rows_`'s plan for one permutation and batch size (int32 vectors, ~3 x 4 bytes per row):
    the rows to read in list order, where each goes (-1: to its batch's side row), and where each batch's
    side row goes at the end (-1: none)."""

    source: torch.Tensor
    target: torch.Tensor
    side_index: torch.Tensor
    side_target: torch.Tensor
    batch: int


def plan_row_moves(perm: torch.Tensor, batch: int, *, kernel: bool | None = None) -> RowMoves:
    """The moves that take row p to row perm[p] for every p, in place, through a buffer of ``batch`` rows.

    The positions are listed cycle by cycle (each from its smallest position, in the moves' order), and the
    list is moved in batches from its end backward: a batch is gathered whole into the buffer before any of
    it is written, and its rows go to positions it has just read or that a later batch has read, except a
    cycle's last row, whose target (the cycle's first position) lies in an earlier batch when the cycle spans
    batches: that row waits in a side buffer (at most one per batch) until every batch has run. No host
    sync: the backward queues it while the GPU is still busy. Where Triton runs (``kernel``, as for
    :func:`_cycle_tables`), ceil(log2 V) + 2 kernel launches and a cumsum (~25 at Gemma 2's vocabulary); else
    ~175 torch launches, the same moves."""
    v = perm.numel()
    b = batch
    n_batches = -(-v // b)
    leader, rank, length, heads = _cycle_tables(perm, kernel)
    if _kernel_moves(perm, kernel) and v:
        ends = torch.cumsum(heads, 0, dtype=torch.int32)
        source, target, side_index = (torch.empty(v, dtype=torch.int32, device=perm.device) for _ in range(3))
        side_target = torch.full((n_batches,), -1, dtype=torch.int32, device=perm.device)
        cycle_list_kernel[(triton.cdiv(v, CYCLE_BLOCK),)](perm.contiguous(), leader, rank, length, ends, source,
                                                           target, side_index, side_target, v, b,
                                                           BLOCK=CYCLE_BLOCK, **_launch({"num_warps": 4}))
        return RowMoves(source, target, side_index, side_target, b)
    # start of each cycle in the list: the lengths of the cycles with a smaller leader, summed (V-long index
    # vectors are dropped as soon as they are used)
    position = (torch.cumsum(heads, 0) - heads)[leader] + rank  # p's place in the list
    del heads, leader
    order = torch.empty_like(position).scatter_(0, position, torch.arange(v, device=perm.device))
    del position
    place = torch.arange(v, device=perm.device)
    rank = rank[order]
    # A cycle's last row whose cycle began in an earlier batch: parked in side row (its batch), else -1.
    parked = (rank == length[order] - 1) & (place - rank < (place // b) * b)
    del rank, length
    side_index = torch.where(parked, place // b, -1).int()
    target = perm.long()[order]
    side_target = torch.full((n_batches,), -1, dtype=torch.long, device=perm.device)
    side_target.scatter_reduce_(0, torch.where(parked, place // b, n_batches - 1), torch.where(parked, target, -1),
                                reduce="amax")
    target = torch.where(parked, -1, target).int()
    return RowMoves(order.int(), target, side_index, side_target.int(), b)


def permute_rows_(x: torch.Tensor, perm: torch.Tensor | None, buffer: torch.Tensor,
                  moves: RowMoves | None = None) -> torch.Tensor:
    """Move row p of ``x`` to row perm[p] for every p, in place (``perm``: a permutation of x's rows, int32 or
    int64), through ``buffer`` (B x x.shape[1], x's dtype): ~x's bytes read and written twice, no host sync.
    ``moves``: :func:`plan_row_moves` (perm, B), planned ahead (``perm`` is then unused)."""
    v, d = x.shape
    if moves is None:
        if perm.numel() != v:
            raise ValueError(f"perm has {perm.numel()} entries for {v} rows")
        if v == 0:
            return x
        moves = plan_row_moves(perm, buffer.shape[0])
    b = moves.batch
    if moves.source.numel() != v or buffer.shape[0] < b:
        raise ValueError(f"moves planned for {moves.source.numel()} rows in batches of {b}, not {v} rows "
                         f"through a buffer of {buffer.shape[0]}")
    n_batches = moves.side_target.numel()
    side = torch.empty((n_batches, d), dtype=x.dtype, device=x.device)
    for s0 in range((n_batches - 1) * b, -1, -b):
        s1 = min(s0 + b, v)
        rows = buffer[: s1 - s0]
        torch.index_select(x, 0, moves.source[s0:s1], out=rows)
        scatter_rows(x, moves.target[s0:s1], rows, add=False, side=side, side_index=moves.side_index[s0:s1])
    scatter_rows(x, moves.side_target, side, add=False)
    return x


def _slab_view(buffer: torch.Tensor, n: int, cols: int) -> torch.Tensor:
    return buffer[: n * cols].view(n, cols)


def n_slabs(n: int, vocab: int, slab_bytes: int | None = None) -> int:
    """How many slabs cover the vocabulary (the rows of the forward's per-slab log-sum-exp table)."""
    return -(-vocab // slab_columns(n, vocab, slab_bytes))


# Codes of the compact slab table per nat: a slab's mass is known to within 1/16 nat (6%), rounded up.
CODE_SCALE = 16


class SlabTable(NamedTuple):
    """The filtered backward's view of each row's softmax mass per slab, in ~1 byte per (slab, row).

    Slabs are taken ``group`` at a time (one forward program walks a group's slabs in order): ``lse`` holds
    each group's log-sum-exp per row (float32, (groups, N)), the forward's partials; ``codes`` (uint8,
    (slabs, N)) how far each slab's log-sum-exp lies below its group's running log-sum-exp once the slab is
    in, in 1 / CODE_SCALE nats rounded down, capped at 255. :meth:`bounds` decodes them into upper bounds of
    the slabs' log-sum-exps: the backward then keeps at least every slab it would keep with exact masses. At
    Gemma 2's shape (63 slabs, 8192 tokens, groups of 16) that is 0.62 MB against the float32 table's 2.0."""

    lse: torch.Tensor
    codes: torch.Tensor
    group: int

    def bounds(self) -> torch.Tensor:
        """(slabs, N) float32: an upper bound of every row's log-sum-exp over each slab.

        Within a group, with R_k the running log-sum-exp once slab k is in and gap_k = R_k - s_k its code's
        interval [c/S, (c+1)/S), R_{k-1} = R_k + log(1 - exp(-gap_k)) <= R_k + log(1 - exp(-(c+1)/S)). From
        the group's exact total downwards this bounds every R_k from above, and s_k <= R_k - c/S. Decoding
        every code against the group's total instead would count a group of equal slabs 3.4 times over
        (16 slabs: the harmonic sum), and the backward would drop fewer trailing slabs than it may.
        """
        n_slab, n = self.codes.shape
        group, n_groups = self.group, self.lse.shape[0]
        low = self.codes.float() / CODE_SCALE
        # log(1 - exp(-gap_hi)) per slab, 0 where the gap is unbounded (capped codes); gap_hi a hair above
        # (c+1)/S, for gaps that float32 rounding put just below a code's edge
        step = torch.where(self.codes < 255, torch.log(-torch.expm1(-(low + 1.01 / CODE_SCALE))), 0.0)
        padded = torch.zeros((n_groups * group, n), dtype=torch.float32, device=self.codes.device)
        padded[:n_slab] = step
        after = padded.view(n_groups, group, n).flip(1).cumsum(1).flip(1)  # sum over slabs k, k + 1, ...
        after = (after - padded.view(n_groups, group, n)).reshape(-1, n)[:n_slab]  # ... over k + 1, ...
        of_group = torch.arange(n_slab, device=self.codes.device) // group
        return self.lse.index_select(0, of_group) + after - low


def encode_table(slab_lse: torch.Tensor, group: int) -> SlabTable:
    """The :class:`SlabTable` of a float32 (slabs, N) table of per-slab log-sum-exps: what the Hopper
    forward writes directly (cuBLAS slabs write the float32 table first, then this)."""
    n_slab, n = slab_lse.shape
    n_groups = -(-n_slab // group)
    padded = torch.full((n_groups * group, n), float("-inf"), dtype=torch.float32, device=slab_lse.device)
    padded[:n_slab] = slab_lse
    running = torch.logcumsumexp(padded.view(n_groups, group, n), dim=1)
    gap = (running - padded.view(n_groups, group, n)).reshape(-1, n)[:n_slab]
    gap = torch.nan_to_num(gap.clamp_min(0.0), nan=float("inf"))  # -inf - -inf: an empty slab, the largest code
    codes = torch.floor(gap * CODE_SCALE).clamp_(max=255.0).to(torch.uint8)
    return SlabTable(running[:, -1].contiguous(), codes, group)


def slabs_per_group(n: int, n_slab: int, sms: int, block_n: int) -> int:
    """Slabs per group of the compact table. The Hopper forward runs (row blocks x groups) programs, one per
    SM at a time; fewer groups make a smaller table but fewer, longer programs. The fewest groups whose grid
    fills at least one wave with under 10% of SM-time lost to a partial last wave (at Gemma 2's shape on 132
    SMs: 4 groups of 16 slabs, 256 programs, 4.5% lost), else the best such share."""
    n_blocks = -(-n // block_n)
    best = None
    for want in range(1, n_slab + 1):
        per = -(-n_slab // want)
        programs = n_blocks * -(-n_slab // per)
        efficiency = n_blocks * n_slab / (-(-programs // sms) * sms * per)
        if programs >= sms and efficiency >= 0.9:
            return per
        if best is None or efficiency > best[0] + 1e-9:
            best = (efficiency, per)
    return best[1]


def empty_table(e: torch.Tensor, c: torch.Tensor, slab_bytes: int | None = None) -> SlabTable:
    """An unfilled :class:`SlabTable` for :func:`forward_stats` (``slab_lse``) of e's tokens against c."""
    n = e.shape[0]
    n_slab = n_slabs(n, c.shape[0], slab_bytes)
    block_n = configs.config_for("tma", e.dtype, e.device, e.shape[1])["BLOCK_N"] if tma_applies(e, c) else 128
    group = slabs_per_group(n, n_slab, _num_sms(e.device.index or 0) if e.is_cuda else 4, block_n)
    lse = torch.empty((-(-n_slab // group), n), dtype=torch.float32, device=e.device)
    return SlabTable(lse, torch.empty((n_slab, n), dtype=torch.uint8, device=e.device), group)


def _permuted(targets: torch.Tensor, bias, perm, vocab: int):
    """Targets as positions in the sorted vocabulary (-1 where a target is no vocabulary index) and the
    bias in sorted order: the kernels compare and index by column position. No V-long index vector: the
    training forward's peak holds the permutation and the table only."""
    if perm is None:
        return targets, bias
    return order.positions(perm, targets, vocab), (bias.index_select(0, perm) if bias is not None else None)


def _classifier_slab(c, perm, start: int, cols: int, buffer):
    """Rows [start, start + cols) of the classifier in (optionally sorted) vocabulary order."""
    if perm is None:
        return c[start:start + cols]
    out = buffer[:cols]
    torch.index_select(c, 0, perm[start:start + cols], out=out)
    return out


def _descriptor_ready(t: torch.Tensor) -> bool:
    # A tensor descriptor needs a unit inner stride and 16-byte aligned rows and base address.
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


def tma_applies(e: torch.Tensor, c: torch.Tensor, *, backward: bool = False) -> bool:
    """Whether the descriptor-fed kernels replace cuBLAS slabs: :func:`forward_stats`'s fused forward and,
    with ``backward``, the backward's logit-gradient kernel (:mod:`lmforge.cce.kernels.tma_grad`). By default
    on sm_90+ GPUs for 16-bit inputs whose rows suit a tensor descriptor. ``LMFORGE_CCE_TMA``: ``1`` forces
    both where they can run at all (e.g. under the interpreter), ``forward`` keeps the backward on cuBLAS
    slabs, ``0`` keeps both. Before Hopper there is no TMA and cuBLAS slabs stay (not measured there);
    float32 inputs keep cuBLAS's full-precision products."""
    choice = os.environ.get("LMFORGE_CCE_TMA", "auto")
    if choice not in ("auto", "0", "1", "forward"):
        raise ValueError(f"LMFORGE_CCE_TMA must be auto, 0, 1 or forward, got {choice!r}")
    if choice == "0" or (backward and choice == "forward"):
        return False
    if TensorDescriptor is None or e.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (_descriptor_ready(e) and _descriptor_ready(c) and c.dtype == e.dtype):
        return False
    if choice == "1":
        return True
    return e.is_cuda and configs.compute_capability(e.device) >= 90 and not interpreting()


@functools.lru_cache(maxsize=4096)  # asked once per slab in the backward: plain integers, cached
def tma_splits(n_blocks: int, n_slab: int, slab_tiles: int, sms: int, block_v: int) -> tuple[int, int]:
    """(splits per slab, columns per split) for :func:`lse_tma_kernel`'s grid of n_blocks x (n_slab x splits)
    programs, one program per SM at a time (its 128 x 256 tile's pipeline fills shared memory).

    Programs run in waves of ``sms``; a last wave that is mostly empty leaves SMs idle for a whole program's
    time. The splits (each a run of whole tiles) are the fewest that give at least four waves, where the work
    allows, with a wave quantisation loss under 5%. On an H200 (132 SMs) at Gemma 2 2B's shape 8, 16 or 33
    splits (3.9, 7.8 or 16.0 waves) took 14.44, 14.57 and 14.40 ms against 15.78 for v3.6's 9 (4.4 waves)
    (bench/cce_fused_slab_probe.py, 2026-11-30, GPU time alone).
    """
    min_programs = min(4 * sms, n_blocks * n_slab * slab_tiles)
    best = None
    for want in range(1, slab_tiles + 1):
        per = -(-slab_tiles // want)  # ceil division (triton.cdiv costs microseconds per call from Python)
        sub = -(-slab_tiles // per)
        programs = n_blocks * n_slab * sub
        if programs < min_programs:
            continue
        # Busy SM-time over the SM-time the waves take, counting each program as one of the longest.
        efficiency = n_blocks * n_slab * slab_tiles / (-(-programs // sms) * sms * per)
        if best is None or efficiency > best[0] + 1e-9:
            best = (efficiency, sub, per)
        if efficiency >= 0.95:
            break
    _, sub, per = best
    return sub, per * block_v


BAND_ROWS = 16  # row blocks per band of lse_tma_kernel's banded launch order


def launch_band(n_parts: int) -> int:
    """Row blocks per band of :func:`lse_tma_kernel`'s launch order for a grid of row blocks x ``n_parts``
    (0: row-major). Banded where measured faster (H100, 2026-12-07, `bench/cce_forward_groups.py`, in two
    rounds): 10 splits (the eval forward) and 4 groups (the shipped tables at Gemma 2 and Qwen 2.5), 0.1-0.6
    ms each; not with 3 groups, where Qwen's forward took 20.6 ms banded against 16.9."""
    return BAND_ROWS if n_parts >= 4 else 0


def tma_grid(e, c, cols_per_slab, slab_lse, cfg=None) -> tuple[int, int, int, int, int]:
    """:func:`lse_tma_kernel`'s grid for :func:`forward_stats`' ``slab_lse``: (row blocks, slab columns,
    splits per slab, columns per split, parts), the grid being row blocks x parts. One slab of the whole
    vocabulary unless the filtered backward needs a per-slab table; a :class:`SlabTable`'s parts are its
    groups, else each slab is cut into :func:`tma_splits`. ``cfg``: the "tma" launch config, if in hand."""
    n, vocab = e.shape[0], c.shape[0]
    cfg = cfg or configs.config_for("tma", e.dtype, e.device, e.shape[1])
    n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    slab = cols_per_slab if slab_lse is not None else vocab
    if isinstance(slab_lse, SlabTable):
        return n_blocks, slab, 1, slab, slab_lse.lse.shape[0]
    n_slab = -(-vocab // slab)
    sms = _num_sms(e.device.index or 0) if e.is_cuda else 4
    sub, v_per_sub = tma_splits(n_blocks, n_slab, triton.cdiv(slab, cfg["BLOCK_V"]), sms, cfg["BLOCK_V"])
    return n_blocks, slab, sub, v_per_sub, n_slab * sub


def _forward_stats_tma(e, c, slab_bias, slab_targets, *, softcap, need_sum, need_mu, cols_per_slab, perm,
                       slab_lse):
    """:func:`forward_stats` through :func:`lse_tma_kernel`: no logit slab, (splits x N) partials; with a
    :class:`SlabTable` one program per (row block, group of slabs), the group's log-sum-exps as partials."""
    n, d = e.shape
    vocab = c.shape[0]
    cfg = configs.config_for("tma", e.dtype, e.device, d)
    grouped = isinstance(slab_lse, SlabTable)
    n_blocks, slab, sub, v_per_sub, n_parts = tma_grid(e, c, cols_per_slab, slab_lse, cfg)
    n_slab = -(-vocab // slab)
    f32 = dict(dtype=torch.float32, device=e.device)
    if grouped:
        l_part = slab_lse.lse
    else:
        # with one split per slab the splits are the slabs: the kernel writes the table itself
        l_part = slab_lse if slab_lse is not None and sub == 1 else torch.empty((n_parts, n), **f32)
    w_part = torch.empty((n_parts, n), **f32) if need_mu else l_part
    sum_part = torch.empty((n_parts, n), **f32) if need_sum else l_part
    tgt = torch.zeros(n, **f32)
    e_desc = TensorDescriptor.from_tensor(e, [cfg["BLOCK_N"], cfg["BLOCK_D"]])
    c_desc = TensorDescriptor.from_tensor(c, [cfg["BLOCK_V"], cfg["BLOCK_D"]])
    launch = _launch_kwargs(cfg)
    lse_tma_kernel[(n_blocks, n_parts)](
        e_desc, c_desc, c, perm if perm is not None else slab_targets,
        slab_bias if slab_bias is not None else l_part, slab_targets,
        l_part, w_part, sum_part, tgt, slab_lse.codes if grouped else l_part, n, vocab, slab, v_per_sub,
        slab_lse.group if grouped else 1, c.stride(0), float(softcap) if softcap is not None else 1.0,
        D=d, SUB=sub, GROUPED=grouped, CODE_SCALE=CODE_SCALE, HAS_BIAS=slab_bias is not None,
        HAS_SOFTCAP=softcap is not None, GATHER=perm is not None, NEED_SUM=need_sum, NEED_MU=need_mu,
        UPCAST=interpreting(), BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        FLATTEN=True, BAND=launch_band(n_parts), **launch,
    )
    if slab_lse is not None and not grouped and sub > 1:
        torch.logsumexp(l_part.view(n_slab, sub, n), dim=1, out=slab_lse)
    lse, sum_logit, mean_logit = combine_splits(l_part, w_part if need_mu else None,
                                                sum_part if need_sum else None)
    return lse, tgt, sum_logit, mean_logit


def forward_stats(e, c, bias, targets, *, softcap=None, need_sum=False, need_mu=False, slab_bytes=None,
                  perm=None, slab_lse=None):
    """Per-token (lse, target_logit, sum_logit, mean_logit), float32, shape (N,) each.

    ``perm``: visit the vocabulary in this order (int32, from :func:`lmforge.cce.order.vocab_order`), so
    that slabs hold tokens of similar mean logit. ``slab_lse``: a float32 (:func:`n_slabs`, N) tensor that
    receives every row's log-sum-exp over each slab (in visiting order), which the filtered backward needs,
    or a :class:`SlabTable` (:func:`empty_table`) that receives the same compactly (what autograd keeps).
    Where :func:`tma_applies` (Hopper, 16-bit inputs) one fused kernel computes it all without a
    logit slab; else cuBLAS writes fp32 slabs that a Triton pass reduces.
    """
    n, vocab = e.shape[0], c.shape[0]
    cols_per_slab = slab_columns(n, vocab, slab_bytes)
    table = slab_lse
    if isinstance(table, SlabTable):
        slab_lse = None if tma_applies(e, c) else torch.empty(tuple(table.codes.shape), dtype=torch.float32,
                                                             device=e.device)
        shape = tuple(table.codes.shape)
    else:
        shape = tuple(slab_lse.shape) if slab_lse is not None else None
    if shape is not None and shape != (n_slabs(n, vocab, slab_bytes), n):
        raise ValueError(f"slab_lse must have shape {(n_slabs(n, vocab, slab_bytes), n)}, got {shape}")
    slab_targets, slab_bias = _permuted(targets, bias, perm, vocab)
    if tma_applies(e, c):
        return _forward_stats_tma(e, c, slab_bias, slab_targets, softcap=softcap, need_sum=need_sum,
                                  need_mu=need_mu, cols_per_slab=cols_per_slab, perm=perm, slab_lse=table)
    cfg = _blocks(e.device, "stats")
    f32 = dict(dtype=torch.float32, device=e.device)
    m = torch.full((n,), float("-inf"), **f32)
    s = torch.zeros(n, **f32)
    w = torch.zeros(n, **f32) if need_mu else s
    zsum = torch.zeros(n, **f32) if need_sum else s
    tgt = torch.zeros(n, **f32)
    c_buffer = torch.empty((cols_per_slab, c.shape[1]), dtype=c.dtype, device=c.device) if perm is not None else None
    buffer = torch.empty(n * cols_per_slab, **f32)
    for index, start in enumerate(range(0, vocab, cols_per_slab)):
        cols = min(cols_per_slab, vocab - start)
        z = _slab_view(buffer, n, cols)
        _logits_into(z, e, _classifier_slab(c, perm, start, cols, c_buffer))
        slab_stats_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            z, slab_bias if slab_bias is not None else z, slab_targets, m, s, w, zsum, tgt,
            slab_lse[index] if slab_lse is not None else m,
            n, cols, start, z.stride(0), float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_SUM=need_sum, NEED_MU=need_mu,
            NEED_SLAB=slab_lse is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], **_launch(cfg),
        )
    del buffer, c_buffer
    if isinstance(table, SlabTable):
        encoded = encode_table(slab_lse, table.group)
        table.lse.copy_(encoded.lse)
        table.codes.copy_(encoded.codes)
    lse = m + torch.log(s)
    mean_logit = w / s if need_mu else torch.zeros_like(lse)
    return lse, tgt, (zsum if need_sum else torch.zeros_like(lse)), mean_logit


def row_depths(slab_lse, lse, g_lse, g_tgt, slab_targets, cols_per_slab: int, filter_eps: float) -> torch.Tensor:
    """(N,) int64: how many leading slabs (in visiting order) each row's backward must visit, from the
    forward's float32 per-slab log-sum-exps or a :class:`SlabTable`'s upper bounds of them.

    Row i drops the longest run of trailing slabs whose summed softmax mass stays <= ``filter_eps`` (their
    logit gradients g_lse_i p_ij are what filtering drops), but keeps every slab up to the one holding its
    target when g_tgt_i != 0; a row with g_lse_i = 0 (an ignored token) needs no slab beyond that one.
    Dropping a suffix rather than the lightest slabs anywhere lets rows sorted by depth share each slab's
    kept rows as one leading block, so the slab's products run on contiguous rows with no gathers (on
    SmolLM2's real activations, 4096-column slabs, 2^-12: 47.3% of (slab, row) pairs kept against 46.4%;
    bench/cce_vocab_positions.py).
    """
    if isinstance(slab_lse, SlabTable):
        slab_lse = slab_lse.bounds()
    n_slab = slab_lse.shape[0]
    mass = torch.exp(slab_lse - lse[None, :])
    trailing = mass.flip(0).cumsum(0).flip(0)  # trailing[k, i]: row i's mass in slabs k, k + 1, ...
    index = torch.arange(1, n_slab + 1, device=mass.device)[:, None]
    # The last slab whose trailing mass exceeds the budget, + 1 (robust to a non-monotone rounded cumsum).
    depth = torch.where(trailing > filter_eps, index, 0).amax(dim=0)
    if g_lse is None:
        depth.zero_()
    else:
        depth = torch.where(g_lse != 0, depth, 0)
    if g_tgt is not None:
        has_target = (g_tgt != 0) & (slab_targets >= 0)
        depth = torch.where(has_target, torch.maximum(depth, slab_targets // cols_per_slab + 1), depth)
    return depth


def _logit_grad_tma(e, c_rows, slab_bias, slab_targets, vectors, softcap, grads: dict, fp8: bool = False):
    """A function ``launch(k, c_row0, cols, start, dz, q8=None, q_scale=None)`` that writes dz (k x cols, the
    inputs' dtype) of e's first k rows against c_rows[c_row0 : c_row0 + cols], the classifier rows at
    vocabulary positions [start, start + cols), by :func:`logit_grad_tma_kernel` (no fp32 logit slab); with
    ``fp8`` also dz's softmax part in e4m3 into q8 (k x cols) and its scales into q_scale (k x tiles). The
    tensor descriptors and launch options are made once per backward: the host's work per slab is the launch
    alone (at SmolLM2's shape a slab's three GPU operations take ~0.2 ms, about what building them each time
    cost)."""
    d = e.shape[1]
    cfg = configs.config_for("tma", e.dtype, e.device, d)
    sms = _num_sms(e.device.index or 0) if e.is_cuda else 4
    e_desc = TensorDescriptor.from_tensor(e, [cfg["BLOCK_N"], cfg["BLOCK_D"]])
    c_desc = TensorDescriptor.from_tensor(c_rows, [cfg["BLOCK_V"], cfg["BLOCK_D"]])
    options = dict(D=d, HAS_BIAS=slab_bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=interpreting(),
                   BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], FLATTEN=True, **grads,
                   FP8=fp8, **_launch_kwargs(cfg))
    bias = slab_bias if slab_bias is not None else e  # never read without HAS_BIAS
    cap = float(softcap) if softcap is not None else 1.0

    def launch(k: int, c_row0: int, cols: int, start: int, dz: torch.Tensor, q8=None, q_scale=None):
        n_blocks = -(-k // cfg["BLOCK_N"])
        sub, v_per_split = tma_splits(n_blocks, 1, -(-cols // cfg["BLOCK_V"]), sms, cfg["BLOCK_V"])
        if not fp8:  # never written without FP8
            q8, q_scale = dz, vectors[0]
        logit_grad_tma_kernel[(n_blocks, sub)](e_desc, c_desc, dz, bias, slab_targets, *vectors, q8, q_scale,
                                               k, cols, start, c_row0, v_per_split, dz.stride(0), q8.stride(0),
                                               q_scale.stride(0), cap, **options)

    return launch


def _slab_dz(buffer, k, cols, start, e_rows, c_rows, slab_bias, targets, vectors, softcap, grads, cfg):
    """dz (k x cols, e_rows' dtype) of e_rows[:k] against the classifier rows c_rows without the TMA kernel:
    cuBLAS writes the fp32 logits into ``buffer`` (float32) and :func:`slab_grad_kernel` turns them into dz in
    place, row i of dz over the first bytes of row i of the logits."""
    z = _slab_view(buffer, k, cols)
    _logits_into(z, e_rows[:k], c_rows)
    narrow = buffer.view(e_rows.dtype) if e_rows.dtype != torch.float32 else buffer
    per_z = narrow.numel() // buffer.numel()  # elements of dz per element of z (2 for 16-bit inputs)
    dz = narrow[: k * cols * per_z].view(k, cols * per_z)[:, :cols]
    slab_grad_kernel[(triton.cdiv(k, cfg["BLOCK_N"]),)](
        z, dz, slab_bias if slab_bias is not None else z, targets, *vectors,
        k, cols, start, z.stride(0), dz.stride(0), float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=slab_bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], **grads, **_launch(cfg))
    return dz


def grads_of(g_lse, g_tgt, g_sum, g_mu) -> dict:
    """The gradient kernels' flags for which upstream gradients are present."""
    return dict(HAS_G_LSE=g_lse is not None, HAS_G_TGT=g_tgt is not None,
                HAS_G_SUM=g_sum is not None, HAS_G_MU=g_mu is not None)


def dc_workspace() -> bool:
    """Whether the filtered backward may keep its workspace in dC's own buffer (route (e) of
    docs/cce-tuning.md): on unless ``LMFORGE_CCE_DC_WORKSPACE=0``. Since v3.14 the default: on an H100 at Gemma
    2's shape (calibrated) 1.033x dE + dC against the two-chunk plan's 1.076x, for 1.7 ms more forward+backward
    (44.5 against 42.9 ms; torch.compile 45.3)."""
    return os.environ.get("LMFORGE_CCE_DC_WORKSPACE", "1") != "0"


def fp8_de() -> str:
    """How the exact backward in vocabulary order may form dE's softmax part from e4m3 products
    (``LMFORGE_CCE_FP8_DE``; experimental, off by default, not yet timed on a GPU): "" (``0``, off),
    "checked" (``1``: rows whose error estimate is too large are recomputed exactly, FP8_ROW_ROOM) or
    "unchecked" (no estimate: to time the check's cost). See :mod:`lmforge.cce.kernels.fp8` and
    :func:`fp8_de_applies`."""
    choice = os.environ.get("LMFORGE_CCE_FP8_DE", "0")
    modes = {"0": "", "1": "checked", "unchecked": "unchecked"}
    if choice not in modes:
        raise ValueError(f"LMFORGE_CCE_FP8_DE must be 0, 1 or unchecked, got {choice!r}")
    return modes[choice]


def fp8_de_applies(e: torch.Tensor, c: torch.Tensor, *, tma: bool, vocab_order: bool, need_de: bool,
                   grads: dict) -> str:
    """:func:`fp8_de` where it can run: the TMA logit-gradient kernel (16-bit inputs on sm_90+, or the
    interpreter), the exact backward in vocabulary order, dE wanted, a loss of lse and target logits
    (every mean or summed cross-entropy; not the z-loss's logit sum or the entropy's softmax-mean logit),
    and a problem whose softmax has not proved too peaked for it (FP8_REFUSE_SHARE). Returns :func:`fp8_de`'s
    mode, or "" where it does not apply."""
    mode = fp8_de()
    if not (mode and tma and vocab_order and need_de) or _problem_key(e, c, 0.0) in _fp8_refused:
        return ""
    if not (grads["HAS_G_LSE"] and grads["HAS_G_TGT"]) or grads["HAS_G_SUM"] or grads["HAS_G_MU"]:
        return ""
    return mode if interpreting() or (e.is_cuda and configs.compute_capability(e.device) >= 89) else ""


def _fp8_blocks(scale_k: int) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, launch options) of :func:`fp8_accumulate_kernel` for tile scales every
    ``scale_k`` columns: 128 x 128 x 128, 8 warps, 4 stages, which compiles for sm_90 to QGMMA without spills
    (not yet timed: bench/cce_fp8_probe.py times it beside other tiles), smaller under the interpreter."""
    if interpreting():
        return 16, 16, min(16, scale_k), {}
    return 128, 128, min(128, scale_k), dict(num_warps=8, num_stages=4)


def _fp8_transpose(out: torch.Tensor, c_piece: torch.Tensor, inv_scale: float) -> None:
    """out[:, :cols] = e4m3(c_piece^T * inv_scale) (out: D x piece, e4m3) by :func:`fp8_transpose_kernel`."""
    cols, d = c_piece.shape
    block_v, block_d = (16, 16) if interpreting() else (64, 64)
    fp8_transpose_kernel[(triton.cdiv(cols, block_v), triton.cdiv(d, block_d))](
        c_piece, out, inv_scale, cols, d, c_piece.stride(0), out.stride(0), EMULATE=interpreting(),
        BLOCK_V=block_v, BLOCK_D=block_d)


def _fp8_accumulate(acc: torch.Tensor, q8: torch.Tensor, q_scale: torch.Tensor, c8t: torch.Tensor,
                    c_scale: float, scale_k: int, tile_norm2: torch.Tensor | None = None,
                    est2: torch.Tensor | None = None) -> None:
    """acc += (q8 scaled by q_scale per row and scale_k columns) @ (c8t^T * c_scale): dE's e4m3 softmax part
    for one step, by :func:`fp8_accumulate_kernel`; with ``est2``, also each row's error-model sum
    sum_v q_v^2 |C_v|^2 into it, |C_v|^2 bounded by ``tile_norm2`` (the largest per scale_k columns)."""
    (m, k), n = q8.shape, c8t.shape[0]
    block_m, block_n, block_k, launch = _fp8_blocks(scale_k)
    estimate = est2 is not None
    fp8_accumulate_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
        TensorDescriptor.from_tensor(q8, [block_m, block_k]), TensorDescriptor.from_tensor(c8t, [block_n, block_k]),
        acc, q_scale, c_scale, tile_norm2 if estimate else q_scale, est2 if estimate else q_scale, m, n, k,
        acc.stride(0), q_scale.stride(0), SCALE_K=scale_k, PER_BLOCK=True, ESTIMATE=estimate,
        UPCAST=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch)


def _add_target_rows(acc, e_rows, c, bias, targets, g_tgt, softcap) -> None:
    """acc += g_tgt f_t C[t] row by row (f_t softcap's derivative at the target logit, recomputed in fp32 from
    the 16-bit rows): the term the e4m3 product leaves out, added exactly. ``acc`` is fp32; callers pass
    FP8_TARGET_ROWS rows at a time (the temporaries are a few rows x D)."""
    vocab = c.shape[0]
    valid = (targets >= 0) & (targets < vocab)
    t = targets.clamp(0, vocab - 1)
    ct = c.index_select(0, t)
    w = torch.where(valid, g_tgt.float(), 0.0)
    if softcap is not None:
        z = (e_rows.float() * ct.float()).sum(dim=1)
        if bias is not None:
            z += bias.index_select(0, t).float()
        w = w * (1.0 - torch.tanh(z / softcap) ** 2)
    acc.addcmul_(ct, w[:, None])


def _fp8_rows_to_redo(est: torch.Tensor, de: torch.Tensor) -> torch.Tensor:
    """Indices of the rows whose e4m3 error estimate ``est`` exceeds FP8_ROW_ROOM of their dE's norm."""
    return torch.nonzero(est > FP8_ROW_ROOM * torch.linalg.vector_norm(de, dim=1, dtype=torch.float32))[:, 0]


def _backward_fp8(e, c, bias, targets, vectors, softcap, cols_per_slab: int, *, out_dtype, need_dc: bool,
                  need_db: bool, checked: bool = True):
    """:func:`backward`'s exact cross-entropy backward in vocabulary order with dE's softmax part from e4m3
    products (:func:`fp8_de_applies`). Pieces of the vocabulary outer, row chunks inner, so that each
    classifier piece is transposed into e4m3 once; per (piece, chunk) step the TMA kernel writes dz (for dC,
    db) and its softmax part in e4m3 with a scale per row and tile, dC's piece is formed (the first chunk) or
    added to (the others) as in :func:`backward`, and the e4m3 product is added straight into dE (its own
    dtype: no fp32 accumulator; on a flat softmax the part summed there is a few % of dE, so bf16 sums of
    its pieces stay far inside the bound). At the end the target rows, g_tgt f_t C[t] (most of dE), are added
    in fp32 and each row of dE is rounded once more; rows whose error estimate (FP8_EST, accumulated by the
    kernel) is over FP8_ROW_ROOM of their norm are then recomputed by the exact path. Returns (dE, dC, db)."""
    n, d = e.shape
    vocab = c.shape[0]
    rows, piece = backward_plan(n, d, vocab, cols_per_slab, elem_bytes=e.element_size(),
                                dz_bytes=e.element_size(), gather_rows=False, gather_cols=False, de_acc=False,
                                budget=backward_budget() or default_budget(n, d, vocab, e.element_size()),
                                max_chunks=EXACT_MAX_CHUNKS, fp8=True)
    grads = grads_of(*vectors[2:4], None, None)
    scale_k = configs.config_for("tma", e.dtype, e.device, d)["BLOCK_V"]
    width = -(-piece // 16) * 16  # rows of e4m3 operands 16-byte aligned, as tensor descriptors need
    buffer = torch.empty(rows * piece, dtype=e.dtype, device=e.device)
    q8 = torch.empty((rows, width), dtype=torch.float8_e4m3fn, device=e.device)
    q_scale = torch.empty((rows, -(-piece // scale_k)), dtype=torch.float32, device=e.device)
    c8t = torch.empty((d, width), dtype=torch.float8_e4m3fn, device=e.device)
    # The classifier rows' squared norms (the error model's weights) and, from the largest (a bound on C's
    # largest entry), the scale that maps C into e4m3's range: one pass over C, one host sync.
    c_norm2 = torch.linalg.vector_norm(c, dim=1, dtype=torch.float32).square_()
    c_scale = max(math.sqrt(float(c_norm2.max())), 1e-30) / E4M3_MAX
    est2 = torch.zeros(n, dtype=torch.float32, device=e.device)
    de = torch.zeros((n, d), dtype=out_dtype, device=e.device)
    dc = torch.empty_like(c, memory_format=torch.contiguous_format) if need_dc else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=c.device) if need_db else None
    spans = [(r0, min(rows, n - r0)) for r0 in range(0, n, rows)]
    launches = [_logit_grad_tma(e[r0:r0 + m], c, bias, targets[r0:r0 + m], tuple(v[r0:r0 + m] for v in vectors),
                                softcap, grads, fp8=True) for r0, m in spans]
    for start in range(0, vocab, piece):  # no filtering: slabs do not matter here, only the pieces' width
        cols = min(piece, vocab - start)
        c_piece = c[start:start + cols]
        _fp8_transpose(c8t[:, :cols], c_piece, 1.0 / c_scale)
        if checked:  # the largest squared row norm in each of the piece's tiles (the error model's bound)
            tile_norm2 = torch.nn.functional.pad(c_norm2[start:start + cols], (0, -cols % scale_k))
            tile_norm2 = tile_norm2.view(-1, scale_k).amax(dim=1)
        for chunk, ((r0, m), launch) in enumerate(zip(spans, launches)):
            dz = buffer[: m * cols].view(m, cols)
            launch(m, start, cols, start, dz, q8[:m, :cols], q_scale[:m])
            _fp8_accumulate(de[r0:r0 + m], q8[:m, :cols], q_scale[:m], c8t[:, :cols], c_scale, scale_k,
                            *((tile_norm2, est2[r0:r0 + m]) if checked else ()))
            if dc is not None:
                if chunk == 0:
                    torch.mm(dz.t(), e[r0:r0 + m], out=dc[start:start + cols])
                else:
                    dc[start:start + cols].addmm_(dz.t(), e[r0:r0 + m])
            if db32 is not None:
                db32[start:start + cols] += dz.sum(dim=0, dtype=torch.float32)
    dz = buffer = q8 = q_scale = c8t = None
    for i in range(0, n, FP8_TARGET_ROWS):
        part = de[i:i + FP8_TARGET_ROWS]
        total = part.float()
        _add_target_rows(total, e[i:i + FP8_TARGET_ROWS], c, bias, targets[i:i + FP8_TARGET_ROWS],
                         vectors[3][i:i + FP8_TARGET_ROWS], softcap)
        part.copy_(total)
    # Rows whose e4m3 error estimate is too large beside their dE: recomputed exactly (bf16 products).
    redo = _fp8_rows_to_redo(FP8_EST * est2.sqrt_(), de) if checked else ()
    if len(redo):
        if len(redo) > FP8_REFUSE_SHARE * n:
            _fp8_refused.add(_problem_key(e, c, 0.0))
        lse, _, g_lse, g_tgt = vectors[:4]
        exact, _, _ = backward(e[redo], c, bias, targets[redo], lse[redo], None, g_lse[redo], g_tgt[redo], None,
                               None, softcap=softcap, need_dc=False, de_dtype=out_dtype, fp8=False)
        de[redo] = exact
    return de, dc, db32.to(bias.dtype) if need_db else None


def _through_rows(rows: int, cols_per_slab: int, d: int, tma: bool) -> int:
    """Rows of ``d`` 16-bit entries that the dC workspace's dz buffer holds once free, for the closing
    permutation's batches: rows x cols_per_slab entries, twice as many 16-bit ones where cuBLAS's slab is fp32."""
    return rows * cols_per_slab * (1 if tma else 2) // d


def _dc_host_layout(n: int, d: int, vocab: int, cols: int, rows: int, counts: list, *, dz_bytes: int):
    """Where :func:`_backward_dc_hosted` keeps its workspace in dC's buffer (rows in the sorted order), or None
    where it does not apply: (first host slab, first row of the fp32 accumulator, first row of the gathered
    classifier slab). The accumulator (rows x d fp32 = 2 rows x d of dC per row) sits in the buffer's last
    2 * rows rows, the classifier slab (cols rows) just before; the host slabs are the trailing slabs that
    cover both. Only the deepest chunk's rows may visit them (their counts <= rows), and when their dC is
    formed at the end those rows (in depth order) must fit beside their dz in the dz buffer. For 16-bit
    inputs (two dC entries hold one fp32 entry)."""
    acc_row = vocab - 2 * rows
    c_row = acc_row - cols
    if c_row < 0 or d % 8:
        return None
    first = c_row // cols
    if first == 0 or counts[first] > rows:
        return None
    k = counts[first]  # counts never grow along the sorted order
    if k * cols * dz_bytes + k * d * 2 > rows * cols * dz_bytes:
        return None
    if (acc_row * d * 2) % 16 or (c_row * d * 2) % 16 or any(
            (start * d * 2) % 16 for start in range(first * cols, vocab, cols)):
        return None  # TMA and cuBLAS want 16-byte aligned rows
    return first, acc_row, c_row


def _backward_dc_hosted(e, c, perm, order, counts, vectors, slab_bias, slab_targets, softcap, grads, cfg, *,
                        tma, rows, cols_per_slab, host, moves=None):
    """The filtered backward (rows in depth order, vocabulary sorted) with its accumulator and gathered
    classifier slab kept in dC's own buffer (route (e) of docs/cce-tuning.md): dC is formed in the sorted
    order, each slab's rows contiguous in place, and moved to the vocabulary's rows at the end
    (:func:`permute_rows_`); the trailing host slabs, visited only by the deepest chunk's rows, are done
    last. The workspace beyond dE and dC is the dz buffer alone (and ``moves``, dC's planned
    :func:`permute_rows_`, when the caller queued it ahead). Returns (dE, dC)."""
    n, d = e.shape
    vocab = c.shape[0]
    first_host, acc_row, c_row = host
    host_start = first_host * cols_per_slab
    chunks = -(-n // rows)
    dc = torch.empty_like(c, memory_format=torch.contiguous_format)
    de = torch.empty((n, d), dtype=e.dtype, device=e.device)
    buffer = torch.empty(rows * cols_per_slab, dtype=e.dtype if tma else torch.float32, device=e.device)
    narrow = buffer.view(e.dtype) if e.dtype != torch.float32 else buffer
    acc_all = dc[acc_row:].view(-1).view(torch.float32).view(rows, d)
    c_buffer = dc[c_row:c_row + cols_per_slab]

    def dz_of(k, cols, start, e_rows, c_rows, chunk_vectors, chunk_targets, grad_tma):
        """dz (k x cols) of e_rows[:k] against c_rows (the slab's classifier rows, already gathered)."""
        if tma:
            dz = buffer[: k * cols].view(k, cols)
            grad_tma(k, 0, cols, start, dz)
            return dz
        return _slab_dz(buffer, k, cols, start, e_rows, c_rows, slab_bias, chunk_targets, chunk_vectors, softcap,
                        grads, cfg)

    for chunk in reversed(range(chunks)):  # shallow rows first: the deepest chunk is the only one at the hosts
        r0 = chunk * rows
        m = min(rows, n - r0)
        e_chunk = torch.index_select(e, 0, order[r0:r0 + m], out=de[r0:r0 + m])
        chunk_vectors = tuple(v[r0:r0 + m] for v in vectors)
        chunk_targets = slab_targets[r0:r0 + m]
        acc = acc_all[:m].zero_()
        grad_tma = (_logit_grad_tma(e_chunk, c_buffer, slab_bias, chunk_targets, chunk_vectors, softcap, grads)
                    if tma else None)
        first_written = chunk == chunks - 1
        for index, start in enumerate(range(0, vocab, cols_per_slab)):
            k = min(max(counts[index] - r0, 0), m)
            cols = min(cols_per_slab, vocab - start)
            hosted = start >= host_start
            if k == 0:
                if first_written and not hosted:
                    dc[start:start + cols].zero_()
                continue
            c_slab = _classifier_slab(c, perm, start, cols, c_buffer)
            dz = dz_of(k, cols, start, e_chunk, c_slab, chunk_vectors, chunk_targets, grad_tma)
            _accumulate_matmul(acc[:k], dz, c_slab)
            if hosted:
                continue  # its dC comes once the accumulator has left these rows
            if first_written:
                torch.mm(dz.t(), e_chunk[:k], out=dc[start:start + cols])
            else:
                dc[start:start + cols].addmm_(dz.t(), e_chunk[:k])
        de[r0:r0 + m].copy_(acc)  # the chunk's dE, rounded once, over its gathered rows
    # The host slabs' dC: their rows are free now. Each gathers its own classifier rows into its own dC rows,
    # recomputes dz for the few deep rows that visit it (gathered again, beside dz in the buffer), and forms
    # its dC over them (the product reads dz and the rows, not the classifier rows it overwrites).
    acc_all = acc = c_buffer = None
    m0 = min(rows, n)
    k_max = counts[first_host]
    head = tuple(v[:m0] for v in vectors)
    e_rows = narrow[narrow.numel() - k_max * d:].view(k_max, d) if k_max else None
    if k_max:
        torch.index_select(e, 0, order[:k_max], out=e_rows)
    for index in range(first_host, len(counts)):
        start = index * cols_per_slab
        cols = min(cols_per_slab, vocab - start)
        k = counts[index]
        own = dc[start:start + cols]
        if k == 0:
            own.zero_()
            continue
        c_slab = _classifier_slab(c, perm, start, cols, own)
        grad_tma = (_logit_grad_tma(e_rows, own, slab_bias, slab_targets[:k_max], head, softcap, grads)
                    if tma else None)
        dz = dz_of(k, cols, start, e_rows, c_slab, head, slab_targets[:m0], grad_tma)
        torch.mm(dz.t(), e_rows[:k], out=own)
    # Back to the vocabulary's rows (dC) and the tokens' rows (dE), in place, through the dz buffer.
    dz = c_slab = e_rows = grad_tma = None
    through = narrow.view(-1)[: _through_rows(rows, cols_per_slab, d, tma) * d].view(-1, d)
    if n <= through.shape[0]:  # dE fits the free buffer whole: out of place, each row read and written twice
        depth_rows = through[:n].copy_(de)
        de.index_copy_(0, order, depth_rows)
    else:
        permute_rows_(de, order, through)
    permute_rows_(dc, perm, through, moves if moves is not None and moves.batch <= through.shape[0] else None)
    return de, dc


def backward(e, c, bias, targets, lse, mean_logit, g_lse, g_tgt, g_sum, g_mu, *, softcap=None,
             need_de=True, need_dc=True, need_db=False, slab_bytes=None, perm=None, slab_lse=None,
             filter_eps=None, de_dtype=None, fp8=True):
    """Gradients (dE, dC, db) for upstream per-token gradients of the four statistics.

    Exact unless ``filter_eps`` and the forward's ``slab_lse`` (same ``perm``) are given and only g_lse /
    g_tgt are: then rows are ordered by :func:`row_depths` (deepest first) and slab k's products run over
    the leading rows that still need it, so every row loses at most ``filter_eps`` of its softmax mass to
    skipped slabs and the skipped work is never done (unless rows would keep >= ``DENSE_SHARE`` of the
    work: then the backward is exact). dE is accumulated in float32 and returned in ``de_dtype`` (default
    e's dtype).

    The rows run in chunks (each with its own fp32 dE accumulator; the sorted order gathers each chunk's
    rows, into dE's rows where dE has e's dtype) and the slabs in pieces, as :func:`backward_budget` says:
    by default :func:`backward_plan`'s split within :func:`default_budget` in vocabulary order,
    :func:`sorted_rows` per chunk in the sorted order, one chunk of whole slabs for small problems. With
    more than one chunk, dC is the sum of the chunks' parts: in vocabulary order each is added in fp32 to
    the rounded sum of those before; in the sorted order each is rounded, then added to the vocabulary's
    rows (one more rounding per chunk, one launch fewer per step).

    With ``fp8`` (the default) the exact cross-entropy backward in vocabulary order takes the e4m3 dE path
    where ``LMFORGE_CCE_FP8_DE`` asks for it (:func:`fp8_de_applies`); that path passes ``fp8=False`` to
    recompute the rows its check flags.
    """
    n, d = e.shape
    vocab = c.shape[0]
    cols_per_slab = slab_columns(n, vocab, slab_bytes)
    cfg = _blocks(e.device, "grad")
    slab_targets, slab_bias = _permuted(targets, bias, perm, vocab)
    vectors = (lse, mean_logit if g_mu is not None else lse, g_lse if g_lse is not None else lse,
               g_tgt if g_tgt is not None else lse, g_sum if g_sum is not None else lse,
               g_mu if g_mu is not None else lse)
    counts, order, moves = [n] * -(-vocab // cols_per_slab), None, None
    tma = tma_applies(e, c, backward=True)
    filtered = filter_eps is not None and slab_lse is not None and g_sum is None and g_mu is None
    # Whether the dC workspace may take this backward (16-bit dE and dC in e's dtype, no db), given a sorted
    # order whose rows live in dE and whole-slab steps (checked below) and room for it (_dc_host_layout).
    workspace = (need_de and need_dc and not need_db and (de_dtype or e.dtype) == e.dtype == c.dtype
                 and e.element_size() == 2 and dc_workspace())
    if (workspace and filtered and perm is not None and backward_budget() is None
            and (n + vocab) * d * e.element_size() >= SMALL_GRAD_BYTES):
        # The dC workspace's closing permutation, planned (~25 small launches) before the host sync below,
        # while the GPU is still busy with the forward; dropped if the plan below does not host dC.
        moves = plan_row_moves(perm, _through_rows(sorted_rows(n), cols_per_slab, d, tma))
    if filtered:
        depth = row_depths(slab_lse, lse, g_lse, g_tgt, slab_targets, cols_per_slab, filter_eps)
        # One host sync for the whole plan: how many rows reach each slab.
        counts = torch.bincount(depth, minlength=len(counts) + 1).flip(0).cumsum(0).flip(0)[1:].tolist()
        dense = sum(counts) >= DENSE_SHARE * n * len(counts)
        _note_backward(e, c, filter_eps, dense)
        if dense:  # too little to skip: exact, in vocabulary order
            counts, perm = [n] * len(counts), None
            slab_targets, slab_bias = targets, bias
        else:  # rows deepest first: slab k's kept rows are the leading counts[k]
            order = torch.argsort(depth, descending=True, stable=True)
            vectors = tuple(v.index_select(0, order) for v in vectors)
            slab_targets = slab_targets.index_select(0, order)
        del depth
    # The logit slab (fp32) that cuBLAS writes and dz overwrites, or with the TMA kernel dz alone (tma).
    out_dtype = de_dtype or e.dtype
    # fp32 dE in the tokens' own row order (vocabulary-parallel ranks) is accumulated in the output itself.
    de_direct = need_de and out_dtype == torch.float32 and order is None
    # In the sorted order each chunk's rows, gathered in depth order, live in the chunk's own rows of dE (kept
    # in depth order until the end) until its accumulator is rounded over them: no separate gathered copy.
    rows_in_de = order is not None and need_de and out_dtype == e.dtype
    # dE's softmax part from e4m3 products (LMFORGE_CCE_FP8_DE=1, experimental): the exact backward only.
    mode = fp8 and fp8_de_applies(e, c, tma=tma, vocab_order=perm is None and order is None, need_de=need_de,
                                  grads=grads_of(g_lse, g_tgt, g_sum, g_mu))
    if mode:
        return _backward_fp8(e, c, bias, targets, vectors, softcap, cols_per_slab, out_dtype=out_dtype,
                             need_dc=need_dc, need_db=need_db, checked=mode == "checked")
    budget = backward_budget()
    if budget is None and (n + vocab) * d * e.element_size() < SMALL_GRAD_BYTES:
        rows, piece = n, cols_per_slab  # a small problem: one chunk of whole slabs
    elif budget is None and order is not None:  # the sorted order's default (see SORTED_CHUNKS)
        rows, piece = sorted_rows(n), cols_per_slab
    else:
        rows, piece = backward_plan(n, d, vocab, cols_per_slab, elem_bytes=e.element_size(),
                                    dz_bytes=e.element_size() if tma else 4,
                                    gather_rows=order is not None and not rows_in_de,
                                    gather_cols=perm is not None, de_acc=need_de and not de_direct,
                                    budget=budget if budget is not None else default_budget(n, d, vocab,
                                                                                            e.element_size()),
                                    max_chunks=EXACT_MAX_CHUNKS if perm is None else None)
    chunks = -(-n // rows)
    host = (_dc_host_layout(n, d, vocab, cols_per_slab, rows, counts, dz_bytes=e.element_size() if tma else 4)
            if workspace and rows_in_de and piece == cols_per_slab else None)
    if host is not None:
        de, dc = _backward_dc_hosted(e, c, perm, order, counts, vectors, slab_bias, slab_targets, softcap,
                                     grads_of(g_lse, g_tgt, g_sum, g_mu), cfg, tma=tma, rows=rows,
                                     cols_per_slab=cols_per_slab, host=host, moves=moves)
        return de, dc, None
    moves = None  # planned for the dC workspace, which the plan above did not take
    buffer = torch.empty(rows * piece, dtype=e.dtype if tma else torch.float32, device=e.device)
    de = torch.zeros((n, d), dtype=out_dtype, device=e.device) if de_direct else None
    de32 = torch.zeros((rows, d), dtype=torch.float32, device=e.device) if need_de and not de_direct else None
    if rows_in_de or (de32 is not None and chunks > 1):  # filled chunk by chunk (else converted at the end)
        de = torch.empty((n, d), dtype=out_dtype, device=e.device)
    dc = torch.empty_like(c, memory_format=torch.contiguous_format) if need_dc else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=c.device) if need_db else None
    # The sorted order gathers each classifier piece into c_buffer; once dE has used it, the piece's dC is
    # formed there too before it is scattered back to the tokens' rows.
    c_buffer = torch.empty((piece, d), dtype=c.dtype, device=c.device) if perm is not None else None
    e_buffer = (torch.empty((rows, d), dtype=e.dtype, device=e.device) if order is not None and not rows_in_de
                else None)
    grads = grads_of(g_lse, g_tgt, g_sum, g_mu)
    dz = c_slab = dc_slab = grad_tma = None
    for chunk in range(chunks):
        r0 = chunk * rows
        m = min(rows, n - r0)
        if order is not None:  # this chunk's rows, deepest first
            e_chunk = torch.index_select(e, 0, order[r0:r0 + m], out=de[r0:r0 + m] if rows_in_de else e_buffer[:m])
        else:
            e_chunk = e[r0:r0 + m]
        chunk_vectors = tuple(v[r0:r0 + m] for v in vectors)
        chunk_targets = slab_targets[r0:r0 + m]
        acc = de[r0:r0 + m] if de_direct else (de32[:m].zero_() if de32 is not None else None)
        # The TMA kernel reads the classifier's rows where they are: in c itself (vocabulary order) or in
        # the gathered buffer (sorted order).
        if tma:
            grad_tma = _logit_grad_tma(e_chunk, c if perm is None else c_buffer, slab_bias, chunk_targets,
                                       chunk_vectors, softcap, grads)
        for index, slab_start in enumerate(range(0, vocab, cols_per_slab)):
            k = min(max(counts[index] - r0, 0), m)  # the chunk's rows 0 .. k-1 visit this slab
            if k == 0 and chunk > 0:
                continue  # the first chunk wrote this slab's dC (zeros where no row visits it)
            slab_end = min(slab_start + cols_per_slab, vocab)
            for start in range(slab_start, slab_end, piece):
                cols = min(piece, slab_end - start)
                if need_dc:
                    dc_slab = dc[start:start + cols] if perm is None else c_buffer[:cols]
                if k == 0:
                    if dc_slab is not None:
                        dc_slab.zero_()
                else:
                    c_slab = _classifier_slab(c, perm, start, cols, c_buffer)
                    if tma:
                        dz = buffer[: k * cols].view(k, cols)
                        grad_tma(k, start if perm is None else 0, cols, start, dz)
                    else:
                        dz = _slab_dz(buffer, k, cols, start, e_chunk, c_slab, slab_bias, chunk_targets,
                                      chunk_vectors, softcap, grads, cfg)
                    if acc is not None:
                        _accumulate_matmul(acc[:k], dz, c_slab)
                    if dc_slab is not None:  # after dE: in the sorted order it overwrites the gathered c_slab
                        if chunk == 0 or perm is not None:
                            torch.mm(dz.t(), e_chunk[:k], out=dc_slab)
                        else:  # add this chunk's part to what the earlier chunks left in dC
                            dc_slab.addmm_(dz.t(), e_chunk[:k])
                    if need_db:
                        db_slab = dz.sum(dim=0, dtype=torch.float32)
                        if perm is None:
                            db32[start:start + cols] += db_slab
                        else:
                            db32.index_add_(0, perm[start:start + cols], db_slab)
                if dc_slab is not None and perm is not None:  # back to the vocabulary's rows (int32 indices);
                    # after the first chunk the chunk's part, rounded, is added to the earlier chunks' sum
                    scatter_rows(dc, perm[start:start + cols], dc_slab, add=chunk > 0)
        # The chunk's dE, rounded once: into its own rows of dE (the tokens' rows, or in depth order over the
        # gathered rows), else (sorted order, dE in another dtype) scattered into the tokens' rows.
        if rows_in_de or (de32 is not None and chunks > 1 and order is None):
            de[r0:r0 + m].copy_(de32[:m])
        elif de32 is not None and chunks > 1:
            rounded = e_buffer[:m] if e_buffer.dtype == out_dtype else torch.empty((m, d), dtype=out_dtype,
                                                                                    device=e.device)
            de.index_copy_(0, order[r0:r0 + m], rounded.copy_(de32[:m]))
    # Free the workspace (the views hold the slab's storage) and the permuted rows before a single chunk's
    # dE is converted, so that the conversion's copies do not add to the slab's peak.
    dz = e_chunk = c_slab = dc_slab = buffer = c_buffer = e_buffer = grad_tma = acc = None
    if de32 is not None and chunks == 1 and not rows_in_de:
        de = de32.to(out_dtype)
    de32 = None
    if order is not None and de is not None and (rows_in_de or chunks == 1):  # depth order -> the tokens' rows
        de = torch.empty_like(de).index_copy_(0, order, de)
    db = db32.to(bias.dtype) if need_db else None
    return de, dc, db

"""The GEMM path's vocabulary order: a stable counting sort with no V-long index vector but its output.

The filtered backward needs the vocabulary split into slabs of W columns by rank of a score (the mean
logit), largest first; the order *within* a slab does not matter. ``torch.argsort`` would give a full order
at the cost of int64 indices and radix double buffers (~6 MB at V = 256000, the training forward's peak).
Here the score is bf16 (it is a bf16 matrix-vector product), so its 16-bit pattern, mapped to a key that
grows as the score falls, orders the vocabulary exactly; ties go to the smaller token id. Four launches:

* ``key_counts_kernel``: a histogram of the 65536 keys (integer atomics: deterministic).
  The host side then knows every key's first rank, and which keys straddle a slab boundary (at most one per
  boundary): only their tokens need a rank among equals, numbered by a "digit" per straddling key.
* ``digit_counts_kernel``: per block of T tokens, how many carry each digit (BINS counters per block).
* ``digit_rank_kernel``: each token's stable rank among its block's tokens of the same digit, CHUNK tokens
  at a time (a CHUNK x CHUNK comparison; the block's running counters live in its row of ``Offsets``,
  which the host filled with the digit's tokens in earlier blocks, plus the slab's first rank in mode 1).
  ``MODE`` 0 writes every token's slab, (its key's first rank + that rank) // W (rank 0 for a key within
  one slab); ``MODE`` 1 scatters token ids to their ranks: run on the slab ids as digits, that is the
  permutation.
* ``sorted_positions_kernel``: where each target token landed, by binary search of perm's entries in the
  sorted targets (N-long vectors only).

Bytes: the sort reads the 2-byte keys three times, the 2-byte slab ids twice and writes 4 bytes of
permutation per token; the ranks cost CHUNK comparisons per token (~33 M at V = 256000). Workspace: the
65536-key histogram and first ranks, BINS counters per block, the slab ids (2 bytes per token).
"""

import triton
import triton.language as tl


@triton.jit
def _descending_key(Score16, idx, mask):
    """16-bit key of a bf16 score (its bits read as int16) that grows as the score falls."""
    u = tl.load(Score16 + idx, mask=mask, other=0).to(tl.int32) & 0xFFFF
    ascending = tl.where(u >= 0x8000, 0xFFFF - u, u | 0x8000)  # the usual order-preserving map of float bits
    return 0xFFFF - ascending


@triton.jit
def key_counts_kernel(Score16, Counts, V, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < V
    key = _descending_key(Score16, idx, mask)
    tl.atomic_add(Counts + key, tl.full([BLOCK], 1, tl.int32), mask=mask)


@triton.jit
def _digit(Source, DigitMap, idx, mask, FROM_KEYS: tl.constexpr):
    """A token's digit (-1: none, it needs no rank); with FROM_KEYS via its key's entry in DigitMap."""
    if FROM_KEYS:
        key = _descending_key(Source, idx, mask)
        d = tl.load(DigitMap + key, mask=mask, other=-1).to(tl.int32)
        return tl.where(mask, d, -1), key
    d = tl.load(Source + idx, mask=mask, other=-1).to(tl.int32)
    return tl.where(mask, d, -1), d


@triton.jit
def digit_counts_kernel(Source, DigitMap, Counts, V, T, BINS: tl.constexpr, FROM_KEYS: tl.constexpr,
                        CHUNK: tl.constexpr):
    block = tl.program_id(0)
    for c0 in range(0, T, CHUNK):
        idx = block * T + c0 + tl.arange(0, CHUNK)
        d, _ = _digit(Source, DigitMap, idx, (idx < V) & (c0 + tl.arange(0, CHUNK) < T), FROM_KEYS)
        tl.atomic_add(Counts + block * BINS + d, tl.full([CHUNK], 1, tl.int32), mask=d >= 0)


@triton.jit
def digit_rank_kernel(Source, DigitMap, KeyStart, Offsets, Out, V, T, W, BINS: tl.constexpr,
                      FROM_KEYS: tl.constexpr, MODE: tl.constexpr, CHUNK: tl.constexpr):
    block = tl.program_id(0)
    lane = tl.arange(0, CHUNK)
    earlier = lane[None, :] < lane[:, None]  # [i, j]: j comes before i
    for c0 in range(0, T, CHUNK):
        idx = block * T + c0 + lane
        mask = (idx < V) & (c0 + lane < T)
        d, key = _digit(Source, DigitMap, idx, mask, FROM_KEYS)
        ranked = d >= 0
        same = (d[:, None] == d[None, :]) & ranked[None, :]
        before = tl.sum((same & earlier).to(tl.int32), axis=1)
        later = tl.sum((same & ~earlier & (lane[None, :] != lane[:, None])).to(tl.int32), axis=1)
        counter = Offsets + block * BINS + d
        rank = tl.load(counter, mask=ranked, other=0) + before
        tl.debug_barrier()  # every lane has read the counters before the last of each digit moves them on
        tl.store(counter, rank + 1, mask=ranked & (later == 0))
        tl.debug_barrier()  # and the next chunk reads them moved
        if MODE == 0:
            first = tl.load(KeyStart + key, mask=mask, other=0)
            slab = (first + tl.where(ranked, rank, 0)) // W
            tl.store(Out + idx, slab.to(Out.dtype.element_ty), mask=mask)
        else:
            tl.store(Out + rank, idx.to(Out.dtype.element_ty), mask=ranked)


@triton.jit
def sorted_positions_kernel(Perm, Sorted, First, V, N, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """First[k] = j where Perm[j] == Sorted[k] and k is the first index of that value in Sorted."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < V
    token = tl.load(Perm + j, mask=mask, other=-1).to(tl.int64)
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.full([BLOCK], 0, tl.int32) + N
    for _ in tl.static_range(STEPS):  # lower bound: the first k with Sorted[k] >= token
        open_ = lo < hi
        mid = (lo + hi) // 2
        value = tl.load(Sorted + mid, mask=open_, other=0)
        right = value < token
        lo = tl.where(open_ & right, mid + 1, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    found = mask & (lo < N)
    found &= tl.load(Sorted + lo, mask=found, other=-1) == token
    tl.store(First + lo, j, mask=found)

"""Data regimes for benchmarking the loss, and the statistics that describe them.

Gradient filtering skips work where the softmax is negligible, so a benchmark's speed and accuracy
depend on how peaked the softmax is and how much mass sits in its tail. Three regimes:

* ``random``: Gaussian hidden states and classifier, logits ~ N(0, 1): a near-uniform softmax.
* ``real``: final hidden states and the (tied) classifier of SmolLM2-135M-Instruct on GSM8K text,
  made by ``bench/cce_real_data.py`` and loaded from a file.
* ``calibrated``: a synthetic generator for any shape whose statistics (:func:`regime_stats`) match the
  real regime: groups of related tokens raised together, chosen from a per-document pool so that
  consecutive rows share context, over a Zipf prior and a Gaussian background, with most rows also
  falling off with the token's rank (so that, as in real data, a row's mass stays in the head of the
  vocabulary sorted by mean logit while a minority of wide rows reach its far tiles); each row's tail
  mass and entropy are imposed (drawn from laws with the real median and mean); targets are sampled from
  the model's own softmax, so NLL and entropy agree as they do for a trained model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from lmforge.files import write_atomic

THRESHOLD = 2.0 ** -12


@torch.no_grad()
def regime_stats(e, c, targets, *, threshold=THRESHOLD, tile=128, chunk=1024, bias=None, slab=4096) -> dict:
    """Mean NLL and entropy, share of softmax entries >= threshold, probability mass below it per row
    (mean and median), the share of tile x tile (token x vocab) tiles holding an entry >= threshold, with
    the vocabulary in its own order and sorted by mean logit, the mean mass per row in the sorted tiles
    that hold none (``tail_mass_skippable``: what a per-tile filter such as Apple's drops), and
    ``slabs_kept``: the share of (slab, row) pairs the GEMM path's filtered backward visits with a budget
    of ``threshold`` (each row drops its longest trailing run of ``slab``-column sorted slabs holding at
    most that much mass, keeping its target's slab; :func:`lmforge.cce.gemm_impl.row_depths`)."""
    n, vocab = e.shape[0], c.shape[0]
    c32 = c.float()
    mean_logit = c32 @ e.float().mean(0)
    if bias is not None:
        mean_logit += bias.float()
    order = torch.argsort(mean_logit, descending=True)
    position = torch.empty_like(order)  # each token's position once the vocabulary is sorted
    position[order] = torch.arange(vocab, device=order.device)
    sorted_tile, sorted_slab = position // tile, position // slab
    n_slab = math.ceil(vocab / slab)
    nll, ent, above, tail, skippable, depths = [], [], 0, [], [], []
    n_vt = math.ceil(vocab / tile)
    occupied = torch.zeros(math.ceil(n / tile), n_vt, dtype=torch.bool)
    occupied_sorted = torch.zeros_like(occupied)
    chunk = max(tile, chunk // tile * tile)
    for start in range(0, n, chunk):
        z = e[start:start + chunk].float() @ c32.T
        if bias is not None:
            z += bias.float()
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        t = targets[start:start + chunk]
        nll.append(-logp.gather(1, t[:, None].long()).squeeze(1))
        ent.append(-(p * logp).sum(-1))
        big = p >= threshold
        above += int(big.sum())
        tail.append((p * ~big).sum(-1))
        pad = n_vt * tile - vocab
        for mask, out in ((big, occupied), (big[:, order], occupied_sorted)):
            m = torch.nn.functional.pad(mask, (0, pad))
            rows = m.shape[0]
            m = torch.nn.functional.pad(m, (0, 0, 0, (-rows) % tile))
            blocks = m.view(-1, tile, n_vt, tile).any(dim=3).any(dim=1)
            out[start // tile:start // tile + blocks.shape[0]] = blocks
        # Mass in the sorted tiles of this chunk's row blocks that hold no entry >= threshold.
        kept = occupied_sorted[start // tile:start // tile + math.ceil(p.shape[0] / tile)].to(p.device)
        row_block = torch.arange(p.shape[0], device=p.device) // tile
        skippable.append((p * ~kept[row_block][:, sorted_tile]).sum(-1))
        slab_mass = torch.zeros(p.shape[0], n_slab, device=p.device).index_add_(1, sorted_slab, p)
        trailing = slab_mass.flip(1).cumsum(1).flip(1)
        depth = torch.where(trailing > threshold, torch.arange(1, n_slab + 1, device=p.device), 0).amax(1)
        depths.append(torch.maximum(depth, sorted_slab[t.long()] + 1))
    tail = torch.cat(tail)
    return dict(nll=float(torch.cat(nll).mean()), entropy=float(torch.cat(ent).mean()),
                share_above=above / (n * vocab), tail_mass_mean=float(tail.mean()),
                tail_mass_median=float(tail.median()),
                tiles_sorted=float(occupied_sorted.float().mean()), tiles_unsorted=float(occupied.float().mean()),
                tail_mass_skippable=float(torch.cat(skippable).mean()),
                slabs_kept=float(torch.cat(depths).float().mean() / n_slab))


# Statistics of the real regime on 8192 tokens (bench/cce_real_data.py); the calibrated generator's target.
REAL_STATS = dict(nll=1.59, entropy=1.55, share_above=0.0012, tail_mass_mean=0.022, tail_mass_median=0.012,
                  tiles_sorted=0.58, tiles_unsorted=0.83, tail_mass_skippable=0.00083, slabs_kept=0.47)


def random_inputs(n, d, v, *, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) / d ** 0.5
    t = torch.randint(0, v, (n,), generator=g)
    return e.to(device, dtype), c.to(device, dtype), t.to(device)


# Parameters of the calibrated generator, fitted at the SmolLM2 shape against the real regime's statistics
# (docs/cce-tuning.md, item 6). The vocabulary falls into ``clusters`` groups of tokens that share a direction
# (a token's weight in its group is uniform in [weight_low, 1]); each row raises ``clusters_per_row`` groups
# drawn from its document's pool of ``pool`` x (V / 49152)^pool_exponent groups (``doc_len`` consecutive
# rows form a document, as consecutive tokens of one text share their context; a larger vocabulary has more
# tile columns to occupy: 16 groups gave the real occupancy at SmolLM2's 49152 tokens, 36 at Gemma's
# 256000), the pools drawn under a popularity law rank^-popularity (1.0: with 0.5 the sorted occupancy grew
# with the number of documents, 74-80% at 8192 rows), over a Zipf prior of exponent ``zipf`` (1.3: with 0.8
# the prior spread the tail over the whole vocabulary, and its mass in tiles without a large entry, what a
# per-tile filter drops, was 4.3x the real one; 1.3 gives 1.4x). Each row's tail mass below 2^-12 is a
# log-normal draw with the real median and mean (``tail_median``, ``tail_sigma``) and its entropy a Gamma
# draw with the real mean; both are imposed by bisections (``rounds`` x ``iters`` softmaxes per row block).
# ``narrow`` = [wide, cutoff]: all rows but a random share ``wide`` also fall off with the token's rank
# (logit - rank / (cutoff V), through one more coordinate), so most rows keep their mass in the head of
# the sorted vocabulary while the wide rows, a third of each 128-row tile, still reach its far tiles. It
# matches the real rows' ``slabs_kept`` (47%: the share of sorted slabs the filtered backward visits),
# which the generator without it overstated (86% at the SmolLM2 shape, 72% at Gemma's) while every other
# statistic matched; the narrow rows' lower entropy and tail are made up by ``entropy_mean`` 1.9 (target
# mean; realised 1.43) and ``tail_sigma`` 1.2 (docs/cce-tuning.md, v3.5). Probe options, off by default:
# ``cutoff`` (one exponential cutoff of the prior at cutoff x V for every row) and ``member_decay`` ([knee,
# width]: tokens rarer than knee x V get exp(-(rank / V - knee) / width) of their group's lift); they
# lower slabs_kept and the sorted tile occupancy together ("Status after v3.4").
CALIBRATED = dict(clusters=3072, clusters_per_row=4, level=7.0, decay=1.0, jitter=1.0, popularity=1.0, zipf=1.3,
                  background=0.5, weight_low=0.8, token_noise=0.3, doc_len=160, pool=16, pool_exponent=0.5,
                  entropy_mean=1.9, entropy_shape=3.0, tail_median=0.012, tail_sigma=1.2, flatten=4.0, lead=15.0,
                  rounds=12, iters=12, cutoff=None, member_decay=None, narrow=(0.35, 0.05))


def _probabilities(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(z, dim=-1)
    return logp, logp.exp()


def _tail_mass(z: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    p = _probabilities(z)[1]
    return (p * (p < threshold)).sum(-1)


def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp, p = _probabilities(z)
    return -(p * logp).sum(-1)


def _coefficients(theta, level, p):
    """Row coefficients of the level, spread and lead directions for the solver's (theta, level):
    theta < 0 flattens the groups' height differences, theta > 0 lifts one leading token."""
    return level, torch.exp(p["flatten"] * theta.clamp(max=0)), p["lead"] * theta.clamp(min=0)


def _solve_rows(parts, target_entropy, target_tail, p):
    """Per-row (theta, level) with the target entropy and tail mass, for logits
    zb + level A + spread B + lead L (:func:`_coefficients`): the level lifts the row's groups above the
    background (less tail); theta moves the entropy. For each theta the level comes from an inner bisection."""
    zb, a_part, b_part, l_part = parts
    n, device = zb.shape[0], zb.device

    def logits(theta, level):
        level, spread, lead = _coefficients(theta, level, p)
        return zb + level[:, None] * a_part + spread[:, None] * b_part + lead[:, None] * l_part

    def level_for(theta):
        lo, hi = torch.full((n,), -10.0, device=device), torch.full((n,), 40.0, device=device)
        for _ in range(p["iters"]):
            mid = (lo + hi) / 2
            heavy = _tail_mass(logits(theta, mid)) > target_tail  # too much tail: lift the groups
            lo, hi = torch.where(heavy, mid, lo), torch.where(heavy, hi, mid)
        return (lo + hi) / 2

    lo, hi = torch.full((n,), -1.0, device=device), torch.full((n,), 1.0, device=device)
    for _ in range(p["rounds"]):
        mid = (lo + hi) / 2
        flat = _entropy(logits(mid, level_for(mid))) > target_entropy  # too flat: sharpen
        lo, hi = torch.where(flat, mid, lo), torch.where(flat, hi, mid)
    theta = (lo + hi) / 2
    return theta, level_for(theta)


@torch.no_grad()
def calibrated_inputs(n, d, v, *, dtype, device, seed=0, params=None, chunk=256):
    """Synthetic (e, c, targets) whose softmax statistics match the real regime (see module docstring).

    The construction is described at :data:`CALIBRATED`. Realised as e @ c^T: the last coordinate carries
    the prior (weight 1 in every row), the others the groups' unit directions a_m (a token's row of c is
    w_j a_m(j) plus ``token_noise`` times its own random direction) and, in e, a Gaussian background. Row i
    is bg_i + level_i sum_k a_ik + spread_i sum_k (h_ik - max_k h_ik) a_ik + lead_i u_leader / ..., with
    level, spread and lead solved per row. Targets are sampled from softmax(e @ c^T). Work runs on
    ``device`` in float32, ``chunk`` rows at a time.
    """
    p = dict(CALIBRATED, **(params or {}))
    g = torch.Generator().manual_seed(seed)
    extra = 1 if p["narrow"] else 0  # a coordinate for the rows' own cutoffs
    dirs, groups, per_row = d - 1 - extra, p["clusters"], p["clusters_per_row"]
    a = torch.randn(groups, dirs, generator=g)
    a /= a.norm(dim=1, keepdim=True)
    member = torch.randperm(v, generator=g) % groups
    weight = p["weight_low"] + (1 - p["weight_low"]) * torch.rand(v, generator=g)
    own = torch.randn(v, dirs, generator=g) / dirs ** 0.5
    rank = torch.randperm(v, generator=g).float() + 1
    if p["member_decay"]:  # tokens rarer than knee x V share less of their group's lift
        knee, width = p["member_decay"]
        weight = weight * torch.exp(-torch.relu(rank / v - knee) / width)
    prior = -p["zipf"] * torch.log(rank)
    if p["cutoff"]:  # an exponential cutoff at cutoff x V: the prior's far tail falls away
        prior -= rank / (p["cutoff"] * v)
    prior -= torch.logsumexp(prior, 0)
    columns = [weight[:, None] * a[member] + p["token_noise"] * own, prior[:, None]]
    if extra:  # narrow rows: logit - rank / (cutoff V); wide rows (share ``wide``) keep the plain prior
        wide, row_cutoff = p["narrow"]
        columns.insert(1, -(rank / v)[:, None])
    c = torch.cat(columns, dim=1)
    popularity = (torch.randperm(groups, generator=g).float() + 1) ** -p["popularity"]
    n_docs = math.ceil(n / p["doc_len"])
    pool = max(1, round(p["pool"] * (v / 49152) ** p["pool_exponent"]))
    pools = torch.multinomial(popularity, n_docs * pool, replacement=True, generator=g).view(n_docs, -1)
    doc = torch.arange(n) // p["doc_len"]
    chosen = pools[doc[:, None], torch.randint(0, pool, (n, per_row), generator=g)]
    heights = p["level"] - p["decay"] * torch.arange(per_row).float() \
        + p["jitter"] * torch.randn(n, per_row, generator=g)
    shape = torch.tensor(p["entropy_shape"])
    torch.manual_seed(seed)
    target_entropy = torch.distributions.Gamma(shape, shape / p["entropy_mean"]).sample((n,))
    target_entropy = target_entropy.clamp(0.05, 0.8 * math.log(v))
    target_tail = (p["tail_median"] * torch.exp(p["tail_sigma"] * torch.randn(n, generator=g))).clamp(1e-4, 0.3)
    if extra:
        beta = (torch.rand(n, generator=g) >= wide).float() / row_cutoff
    c_dev = c.to(device)
    e_rows, targets = [], []
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        m = rows.stop - start
        zero = torch.zeros(m, 1 + extra)
        own_cut = [beta[rows, None]] if extra else []
        background = torch.cat([p["background"] * torch.randn(m, dirs, generator=g), *own_cut, torch.ones(m, 1)],
                               dim=1)
        level_dir = torch.cat([a[chosen[rows]].sum(1), zero], dim=1)
        below_top = heights[rows] - heights[rows].max(dim=1, keepdim=True).values
        spread_dir = torch.cat([(below_top[:, :, None] * a[chosen[rows]]).sum(1), zero], dim=1)
        parts_e = [x.to(device) for x in (background, level_dir, spread_dir)]
        zb, a_part, b_part = (x @ c_dev.T for x in parts_e)
        leader = torch.argmax(zb + 10 * a_part + b_part, dim=1).cpu()
        lead_dir = torch.cat([own[leader] / (p["token_noise"] * (own[leader] ** 2).sum(1, keepdim=True)), zero], dim=1)
        lead_dir = lead_dir.to(device)
        theta, level = _solve_rows((zb, a_part, b_part, lead_dir @ c_dev.T), target_entropy[rows].to(device),
                                   target_tail[rows].to(device), p)
        level, spread, lead = _coefficients(theta, level, p)
        e_chunk = parts_e[0] + level[:, None] * parts_e[1] + spread[:, None] * parts_e[2] + lead[:, None] * lead_dir
        probs = torch.softmax(e_chunk @ c_dev.T, -1).cpu()
        targets.append(torch.multinomial(probs, 1, generator=g).squeeze(1))
        e_rows.append(e_chunk)
    e = torch.cat(e_rows)
    return e.to(device, dtype), c_dev.to(dtype), torch.cat(targets).to(device)


def real_inputs(path, *, dtype, device, n=None):
    """The real regime from bench/cce_real_data.py's file (classifier rebuilt from its Q8_0 blocks)."""
    from safetensors.torch import load_file

    data = load_file(str(path))
    c = data["c_q8"].float() * data["c_scale"].float().repeat_interleave(32, dim=1)
    e, t = data["e"], data["targets"]
    if n is not None:
        e, t = e[:n], t[:n]
    return e.to(device, dtype), c.to(torch.bfloat16).to(device, dtype), t.to(device)


def make_inputs(regime, n, d, v, *, dtype, device, seed=0, real_path=None, cache_dir=None):
    """(e, c, targets) of a regime. ``cache_dir`` (default: ``LMFORGE_CCE_INPUT_CACHE``, unset: no cache)
    keeps calibrated inputs as safetensors files, so that later processes load them instead of solving
    every row again (at Gemma 2's shape, 8192 rows against 256000 tokens each time)."""
    if regime == "random":
        return random_inputs(n, d, v, dtype=dtype, device=device, seed=seed)
    if regime == "calibrated":
        cache_dir = cache_dir or os.environ.get("LMFORGE_CCE_INPUT_CACHE")
        if cache_dir:
            return _cached_calibrated(Path(cache_dir), n, d, v, dtype=dtype, device=torch.device(device),
                                      seed=seed)
        return calibrated_inputs(n, d, v, dtype=dtype, device=device, seed=seed)
    if regime == "real":
        if real_path is None:
            raise ValueError("the real regime needs real_path (made by bench/cce_real_data.py)")
        return real_inputs(real_path, dtype=dtype, device=device, n=n)
    raise ValueError(f"regime must be 'random', 'calibrated' or 'real', got {regime!r}")


def _cached_calibrated(cache_dir: Path, n, d, v, *, dtype, device: torch.device, seed):
    """:func:`calibrated_inputs` through a file cache. The key covers everything the result depends on: the
    shape, dtype, seed, the generator's parameters and source (this module's bytes) and the device type (the
    GPU's float32 sums differ from the CPU's). Files are written under a temporary name and renamed, so
    concurrent processes never read half a file."""
    from safetensors.torch import load_file, save_file

    key = json.dumps(dict(n=n, d=d, v=v, dtype=str(dtype), seed=seed, device=device.type,
                          params=sorted(CALIBRATED.items(), key=lambda kv: kv[0]),
                          source=hashlib.sha256(Path(__file__).read_bytes()).hexdigest()), default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir / f"calibrated-{n}x{d}x{v}-{str(dtype).replace('torch.', '')}-seed{seed}-{digest}.safetensors"
    if path.is_file():
        loaded = load_file(str(path), device=str(device))
        return loaded["e"], loaded["c"], loaded["targets"]
    e, c, targets = calibrated_inputs(n, d, v, dtype=dtype, device=device, seed=seed)
    tensors = {"e": e.contiguous().cpu(), "c": c.contiguous().cpu(), "targets": targets.contiguous().cpu()}
    write_atomic(path, lambda temporary: save_file(tensors, str(temporary)))
    return e, c, targets

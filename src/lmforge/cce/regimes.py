"""Data regimes for benchmarking the loss, and the statistics that describe them.

Gradient filtering skips work where the softmax is negligible, so a benchmark's speed and accuracy
depend on how peaked the softmax is and how much mass sits in its tail. Three regimes:

* ``random``: Gaussian hidden states and classifier, logits ~ N(0, 1): a near-uniform softmax.
* ``real``: final hidden states and the (tied) classifier of SmolLM2-135M-Instruct on GSM8K text,
  made by ``bench/cce_real_data.py`` and loaded from a file.
* ``calibrated``: a synthetic generator for any shape whose statistics (:func:`regime_stats`) match the
  real regime: a Zipf-like prior over the vocabulary, a Gaussian background, and a few candidate tokens
  per position that carry most of the mass; targets are sampled from the model's own softmax, so NLL
  and entropy agree as they do for a trained model.
"""

from __future__ import annotations

import math

import torch

THRESHOLD = 2.0 ** -12


@torch.no_grad()
def regime_stats(e, c, targets, *, threshold=THRESHOLD, tile=128, chunk=1024, bias=None) -> dict:
    """Mean NLL and entropy, share of softmax entries >= threshold, probability mass below it per row
    (mean and median), and the share of tile x tile (token x vocab) tiles holding an entry >= threshold,
    with the vocabulary in its own order and sorted by mean logit."""
    n, vocab = e.shape[0], c.shape[0]
    c32 = c.float()
    mean_logit = c32 @ e.float().mean(0)
    if bias is not None:
        mean_logit += bias.float()
    order = torch.argsort(mean_logit, descending=True)
    nll, ent, above, tail = [], [], 0, []
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
        for mask, out in ((big, occupied), (big[:, order], occupied_sorted)):
            pad = n_vt * tile - vocab
            m = torch.nn.functional.pad(mask, (0, pad))
            rows = m.shape[0]
            m = torch.nn.functional.pad(m, (0, 0, 0, (-rows) % tile))
            blocks = m.view(-1, tile, n_vt, tile).any(dim=3).any(dim=1)
            out[start // tile:start // tile + blocks.shape[0]] = blocks
    tail = torch.cat(tail)
    return dict(nll=float(torch.cat(nll).mean()), entropy=float(torch.cat(ent).mean()),
                share_above=above / (n * vocab), tail_mass_mean=float(tail.mean()),
                tail_mass_median=float(tail.median()),
                tiles_sorted=float(occupied_sorted.float().mean()), tiles_unsorted=float(occupied.float().mean()))


# Statistics of the real regime on 8192 tokens (bench/cce_real_data.py); the calibrated generator's target.
REAL_STATS = dict(nll=1.59, entropy=1.55, share_above=0.0012, tail_mass_mean=0.022, tail_mass_median=0.012,
                  tiles_sorted=0.58, tiles_unsorted=0.83)


def random_inputs(n, d, v, *, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) / d ** 0.5
    t = torch.randint(0, v, (n,), generator=g)
    return e.to(device, dtype), c.to(device, dtype), t.to(device)


# Parameters of the calibrated generator (fitted on the SmolLM2 shape against the real regime's
# statistics; see docs/benchmarks.md). Per-row entropies follow a Gamma law with the real mean and shape 3:
# with shape 1 (an exponential law) too many rows were nearly flat and the mean tail mass came out 1.7x
# the real one.
CALIBRATED = dict(zipf=2.2, candidate_zipf=0.5, background=0.5, candidates=96, peak=7.0, peak_decay=0.18,
                  peak_jitter=1.0, entropy_mean=1.55, entropy_shape=3.0)


def _row_temperatures(e, c, target_entropy, iters=20):
    """Per-row factors tau with H(softmax(tau * e_i @ c^T)) = target_entropy_i (bisection in log tau)."""
    lo = torch.full_like(target_entropy, -4.0)
    hi = torch.full_like(target_entropy, 4.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        logp = torch.log_softmax(mid.exp()[:, None] * (e @ c.T), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        sharper = entropy > target_entropy  # too flat: raise the temperature factor
        lo = torch.where(sharper, mid, lo)
        hi = torch.where(sharper, hi, mid)
    return ((lo + hi) / 2).exp()


@torch.no_grad()
def calibrated_inputs(n, d, v, *, dtype, device, seed=0, params=None, chunk=512):
    """Synthetic (e, c, targets) whose softmax statistics match the real regime (see module docstring).

    Logits are z_ij = tau_i (b_j + s g_ij + sum_k h_ik [j == cand_ik]), realised as a product e @ c^T:
    the last coordinate carries the vocabulary prior b_j (a Zipf law over a random ranking, normalised so
    its mass is the same at any vocabulary size), random unit directions carry the Gaussian background g
    and the candidates' peaks h (candidates drawn from the prior, so frequent tokens are frequent
    continuations). tau_i scales row i so its entropy equals a draw from a Gamma law with the real mean.
    Targets are sampled from softmax(z). Work runs on ``device`` in float32, a chunk of rows at a time.
    """
    p = dict(CALIBRATED, **(params or {}))
    g = torch.Generator().manual_seed(seed)
    dirs = d - 1
    u = torch.randn(v, dirs, generator=g) / dirs ** 0.5
    rank = torch.randperm(v, generator=g).float() + 1
    prior = -p["zipf"] * torch.log(rank)
    prior -= torch.logsumexp(prior, 0)
    c = torch.cat([u, prior[:, None]], dim=1)
    # Candidates follow a flatter Zipf law over the same ranking: plausible continuations spread over the
    # vocabulary (which sets tile occupancy) while the prior's own tail (which sets tail mass) stays light.
    cand_weights = rank ** -p["candidate_zipf"]
    cand = torch.multinomial(cand_weights, n * p["candidates"], replacement=True, generator=g).view(n, -1)
    level = p["peak"] + math.log(v / 49152) - p["peak_decay"] * torch.arange(p["candidates"]).float()
    heights = level + p["peak_jitter"] * torch.randn(n, p["candidates"], generator=g)
    gamma = torch.distributions.Gamma(torch.tensor(p["entropy_shape"]), torch.tensor(p["entropy_shape"] / p["entropy_mean"]))
    torch.manual_seed(seed)
    target_entropy = gamma.sample((n,)).clamp(0.02, 0.8 * math.log(v))
    c_dev = c.to(device)
    e_rows, targets = [], []
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        hidden = p["background"] * torch.randn(rows.stop - start, dirs, generator=g)
        hidden += (heights[rows, :, None] * u[cand[rows]]).sum(1)
        e_chunk = torch.cat([hidden, torch.ones(rows.stop - start, 1)], dim=1).to(device)
        tau = _row_temperatures(e_chunk, c_dev, target_entropy[rows].to(device))
        e_chunk = e_chunk * tau[:, None]
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


def make_inputs(regime, n, d, v, *, dtype, device, seed=0, real_path=None):
    if regime == "random":
        return random_inputs(n, d, v, dtype=dtype, device=device, seed=seed)
    if regime == "calibrated":
        return calibrated_inputs(n, d, v, dtype=dtype, device=device, seed=seed)
    if regime == "real":
        if real_path is None:
            raise ValueError("the real regime needs real_path (made by bench/cce_real_data.py)")
        return real_inputs(real_path, dtype=dtype, device=device, n=n)
    raise ValueError(f"regime must be 'random', 'calibrated' or 'real', got {regime!r}")

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


# Parameters of the calibrated generator (fitted on the SmolLM2 shape, see docs/benchmarks.md).
CALIBRATED = dict(zipf=1.0, zipf_scale=1.1, background=1.3, candidates=24, peak=9.5, peak_decay=0.55,
                  peak_jitter=1.0)


@torch.no_grad()
def calibrated_inputs(n, d, v, *, dtype, device, seed=0, params=None):
    """Synthetic (e, c, targets) whose softmax statistics match the real regime (see module docstring).

    Logits are z_ij = b_j + s * g_ij + sum_k h_ik [j == cand_ik], realised as a product e @ c^T:
    the last coordinate carries the vocabulary prior b_j (a Zipf law over a random ranking, shifted with
    log V so the prior's mass is the same at any vocabulary size), random unit directions carry the
    Gaussian background g and the candidates' peaks h. Targets are sampled from softmax(z).
    """
    p = dict(CALIBRATED, **(params or {}))
    g = torch.Generator().manual_seed(seed)
    dirs = d - 1
    u = torch.randn(v, dirs, generator=g) / dirs ** 0.5
    rank = torch.randperm(v, generator=g).float() + 1
    prior = -p["zipf_scale"] * p["zipf"] * torch.log(rank)
    prior -= torch.logsumexp(prior, 0)  # a normalised log-prior: the same total mass for any V
    c = torch.cat([u, prior[:, None]], dim=1)
    # Candidate tokens: drawn from the prior, so frequent tokens are likely continuations.
    cand = torch.multinomial(prior.exp(), n * p["candidates"], replacement=True, generator=g).view(n, -1)
    level = p["peak"] + math.log(v / 49152) - p["peak_decay"] * torch.arange(p["candidates"]).float()
    heights = level + p["peak_jitter"] * torch.randn(n, p["candidates"], generator=g)
    hidden = p["background"] * torch.randn(n, dirs, generator=g)
    hidden += (heights[..., None] * u[cand]).sum(1)
    e = torch.cat([hidden, torch.ones(n, 1)], dim=1)
    targets = torch.empty(n, dtype=torch.long)
    for start in range(0, n, 1024):
        z = e[start:start + 1024] @ c.T
        targets[start:start + 1024] = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return e.to(device, dtype), c.to(device, dtype), targets.to(device)


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

"""Prototype calibrated generators for the CCE benchmark's "calibrated" regime (issue 3), not yet in the library.

Two designs, both realised as e @ c^T on the benchmark's shapes (docs/cce-tuning.md, item 6):

* clustered: the vocabulary falls into clusters of tokens sharing a direction (weight w_j in [w_lo, 1]);
  each row raises k clusters drawn mostly from its document's pool (consecutive rows share context, as in
  real text) under a popularity law rank^-alpha, over a weaker Zipf prior; one temperature per row sets
  its entropy (as lmforge.cce.regimes.calibrated_inputs does).
* solved: the same clusters, but each row's tail mass below 2^-12 and its entropy are both targets
  (log-normal tails with the real median and mean, Gamma entropies): an inner bisection on the clusters'
  level sets the tail, an outer one on a flatten/leader-boost parameter sets the entropy.

Usage: python bench/calibrated_generator_probe.py {clustered,solved} N D V ['{"param": value, ...}']
prints lmforge.cce.regimes.regime_stats of the generated inputs (compare with the real regime's).
"""
# ruff: noqa: E501

import json
import math
import sys
import time

import torch

from lmforge.cce.regimes import THRESHOLD, _row_temperatures, regime_stats

CLUSTERED = dict(clusters=3072, k=4, level=7.0, decay=1.0, jitter=1.0, alpha=1.0, zipf=1.2, background=0.5,
           w_lo=0.3, sigma_u=0.3, doc_len=160, pool=12, local=0.8, entropy_mean=1.55, entropy_shape=3.0)

SOLVED = dict(clusters=3072, k=4, level=7.0, decay=1.0, jitter=1.0, alpha=0.5, zipf=0.8, background=0.5,
           w_lo=0.8, sigma_u=0.3, doc_len=160, pool=12, local=0.8, entropy_mean=1.55, entropy_shape=3.0,
           tail_median=0.012, tail_sigma=1.06, rounds=12, iters=12, kappa=4.0, lam=15.0, prior_scale=1.0)

@torch.no_grad()
def gen_clustered(n, d, v, seed=0, chunk=512, **kw):
    p = dict(CLUSTERED, **kw)
    g = torch.Generator().manual_seed(seed)
    dirs = d - 1
    M = p["clusters"]
    a = torch.randn(M, dirs, generator=g); a /= a.norm(dim=1, keepdim=True)
    member = torch.randperm(v, generator=g) % M  # token -> cluster, V/M tokens each
    w = p["w_lo"] + (1 - p["w_lo"]) * torch.rand(v, generator=g)
    u = torch.randn(v, dirs, generator=g) / dirs ** 0.5
    rank = torch.randperm(v, generator=g).float() + 1
    prior = -p["zipf"] * torch.log(rank); prior -= torch.logsumexp(prior, 0)
    c = torch.cat([w[:, None] * a[member] + p["sigma_u"] * u, prior[:, None]], dim=1)
    crank = torch.randperm(M, generator=g).float() + 1
    q = crank ** -p["alpha"]
    # documents: each has a pool of clusters; rows draw from the pool with prob `local`
    n_docs = math.ceil(n / p["doc_len"])
    pools = torch.multinomial(q, n_docs * p["pool"], replacement=True, generator=g).view(n_docs, -1)
    doc = torch.arange(n) // p["doc_len"]
    K = p["k"]
    from_pool = torch.rand(n, K, generator=g) < p["local"]
    pick_pool = pools[doc[:, None], torch.randint(0, p["pool"], (n, K), generator=g)]
    pick_glob = torch.multinomial(q, n * K, replacement=True, generator=g).view(n, K)
    chosen = torch.where(from_pool, pick_pool, pick_glob)
    heights = p["level"] - p["decay"] * torch.arange(K).float() + p["jitter"] * torch.randn(n, K, generator=g)
    gamma = torch.distributions.Gamma(torch.tensor(p["entropy_shape"]), torch.tensor(p["entropy_shape"] / p["entropy_mean"]))
    torch.manual_seed(seed)
    target_entropy = gamma.sample((n,)).clamp(0.02, 0.8 * math.log(v))
    es, ts = [], []
    for s in range(0, n, chunk):
        r = slice(s, min(n, s + chunk)); m = r.stop - s
        hidden = p["background"] * torch.randn(m, dirs, generator=g)
        hidden += (heights[r, :, None] * a[chosen[r]]).sum(1)
        ec = torch.cat([hidden, torch.ones(m, 1)], dim=1)
        tau = _row_temperatures(ec, c, target_entropy[r])
        ec = ec * tau[:, None]
        probs = torch.softmax(ec @ c.T, -1)
        ts.append(torch.multinomial(probs, 1, generator=g).squeeze(1)); es.append(ec)
    return torch.cat(es).bfloat16(), c.bfloat16(), torch.cat(ts)

def _entropy_tail(z):
    logp = torch.log_softmax(z, -1); p = logp.exp()
    return -(p * logp).sum(-1), (p * (p < THRESHOLD)).sum(-1)

def _solve(zb, A, B, L, h_ent, h_tail, rounds, iters, kappa=4.0, lam=15.0):
    # z = zb + d*A + s(th)*B + l(th)*L ; outer th (entropy), inner d (tail)
    n = zb.shape[0]

    def z_of(th, d):
        s = torch.exp(kappa * th.clamp(max=0)); l = lam * th.clamp(min=0)
        return zb + d[:, None] * A + s[:, None] * B + l[:, None] * L

    def inner(th):
        lo, hi = torch.full((n,), -10.0), torch.full((n,), 40.0)
        for _ in range(iters):  # tail decreases with d
            mid = (lo + hi) / 2
            _, tail = _entropy_tail(z_of(th, mid))
            up = tail > h_tail
            lo = torch.where(up, mid, lo); hi = torch.where(up, hi, mid)
        return (lo + hi) / 2

    lo, hi = torch.full((n,), -1.0), torch.full((n,), 1.0)
    for _ in range(rounds):
        mid = (lo + hi) / 2
        ent, _ = _entropy_tail(z_of(mid, inner(mid)))
        up = ent > h_ent  # too flat: move towards a leader
        lo = torch.where(up, mid, lo); hi = torch.where(up, hi, mid)
    th = (lo + hi) / 2
    return th, inner(th), z_of


@torch.no_grad()
def gen_solved(n, d, v, seed=0, chunk=256, **kw):
    p = dict(SOLVED, **kw)
    g = torch.Generator().manual_seed(seed)
    dirs = d - 1
    M = p["clusters"]
    a = torch.randn(M, dirs, generator=g); a /= a.norm(dim=1, keepdim=True)
    member = torch.randperm(v, generator=g) % M
    w = p["w_lo"] + (1 - p["w_lo"]) * torch.rand(v, generator=g)
    u = torch.randn(v, dirs, generator=g) / dirs ** 0.5
    rank = torch.randperm(v, generator=g).float() + 1
    prior = -p["zipf"] * torch.log(rank); prior -= torch.logsumexp(prior, 0)
    c = torch.cat([w[:, None] * a[member] + p["sigma_u"] * u, prior[:, None]], dim=1)
    crank = torch.randperm(M, generator=g).float() + 1
    q = crank ** -p["alpha"]
    n_docs = math.ceil(n / p["doc_len"])
    pools = torch.multinomial(q, n_docs * p["pool"], replacement=True, generator=g).view(n_docs, -1)
    doc = torch.arange(n) // p["doc_len"]
    K = p["k"]
    from_pool = torch.rand(n, K, generator=g) < p["local"]
    pick_pool = pools[doc[:, None], torch.randint(0, p["pool"], (n, K), generator=g)]
    pick_glob = torch.multinomial(q, n * K, replacement=True, generator=g).view(n, K)
    chosen = torch.where(from_pool, pick_pool, pick_glob)
    heights = p["level"] - p["decay"] * torch.arange(K).float() + p["jitter"] * torch.randn(n, K, generator=g)
    gamma = torch.distributions.Gamma(torch.tensor(p["entropy_shape"]), torch.tensor(p["entropy_shape"] / p["entropy_mean"]))
    torch.manual_seed(seed)
    h_ent = gamma.sample((n,)).clamp(0.05, 0.8 * math.log(v))
    h_tail = (p["tail_median"] * torch.exp(p["tail_sigma"] * torch.randn(n, generator=g))).clamp(1e-4, 0.3)
    es, ts = [], []
    for st in range(0, n, chunk):
        r = slice(st, min(n, st + chunk)); m = r.stop - st
        bg = torch.cat([p["background"] * torch.randn(m, dirs, generator=g), torch.full((m, 1), p["prior_scale"])], dim=1)
        ones_dir = torch.cat([a[chosen[r]].sum(1), torch.zeros(m, 1)], dim=1)  # unit level on each cluster
        rel = heights[r] - heights[r].max(dim=1, keepdim=True).values  # <= 0: below the row's top cluster
        spread_dir = torch.cat([(rel[:, :, None] * a[chosen[r]]).sum(1), torch.zeros(m, 1)], dim=1)
        zb, A, B = bg @ c.T, ones_dir @ c.T, spread_dir @ c.T
        leader = torch.argmax(zb + 10 * A + B, dim=1)
        lead_dir = torch.cat([u[leader] / (p["sigma_u"] * (u[leader] ** 2).sum(1, keepdim=True)), torch.zeros(m, 1)], dim=1)
        L = lead_dir @ c.T
        th, dd, z_of = _solve(zb, A, B, L, h_ent[r], h_tail[r], p["rounds"], p["iters"], p["kappa"], p["lam"])
        ss = torch.exp(p["kappa"] * th.clamp(max=0)); ll = p["lam"] * th.clamp(min=0)
        ec = bg + dd[:, None] * ones_dir + ss[:, None] * spread_dir + ll[:, None] * lead_dir
        probs = torch.softmax(ec @ c.T, -1)
        ts.append(torch.multinomial(probs, 1, generator=g).squeeze(1)); es.append(ec)
    return torch.cat(es).bfloat16(), c.bfloat16(), torch.cat(ts)



def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    variant, n, d, v = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    params = json.loads(argv[4]) if len(argv) > 4 else {}
    started = time.time()
    e, c, t = {"clustered": gen_clustered, "solved": gen_solved}[variant](n, d, v, **params)
    generated = time.time() - started
    stats = regime_stats(e, c, t)
    print(json.dumps({"variant": variant, "shape": [n, d, v], "params": params, "generation_s": round(generated, 1),
                      **{k: round(x, 5) for k, x in stats.items()}}), flush=True)


if __name__ == "__main__":
    main()

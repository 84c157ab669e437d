"""Calibrated generators for the CCE benchmark's "calibrated" regime (issue 3): a prototype and the library's.

Two designs, both realised as e @ c^T on the benchmark's shapes (docs/cce-tuning.md, item 6):

* clustered: the vocabulary falls into clusters of tokens sharing a direction (weight w_j in [w_lo, 1]);
  each row raises k clusters drawn mostly from its document's pool (consecutive rows share context, as in
  real text) under a popularity law rank^-alpha, over a weaker Zipf prior; one temperature per row sets
  its entropy (as lmforge.cce.regimes.calibrated_inputs did before 2026-11-30).
* library: lmforge.cce.regimes.calibrated_inputs, the design that grew out of it (same clusters, rows draw
  only from their document's pool, and each row's tail mass and entropy are imposed by bisections); its
  ``params`` are the keys of lmforge.cce.regimes.CALIBRATED. (The intermediate "solved" prototype, with
  global cluster picks, is at commit 0597ee1 of this file.)

Usage: python bench/calibrated_generator_probe.py {clustered,library} N D V ['{"param": value, ...}']
prints lmforge.cce.regimes.regime_stats of the generated inputs (compare with the real regime's).
"""
# ruff: noqa: E501

import json
import math
import sys
import time

import torch

from lmforge.cce.regimes import calibrated_inputs, regime_stats

CLUSTERED = dict(clusters=3072, k=4, level=7.0, decay=1.0, jitter=1.0, alpha=1.0, zipf=1.2, background=0.5,
                 w_lo=0.3, sigma_u=0.3, doc_len=160, pool=12, local=0.8, entropy_mean=1.55, entropy_shape=3.0)


def _row_temperatures(e, c, target_entropy, iters=20):
    """Per-row factors tau with H(softmax(tau * e_i @ c^T)) = target_entropy_i (bisection in log tau)."""
    lo = torch.full_like(target_entropy, -4.0)
    hi = torch.full_like(target_entropy, 4.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        logp = torch.log_softmax(mid.exp()[:, None] * (e @ c.T), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        sharper = entropy > target_entropy
        lo = torch.where(sharper, mid, lo)
        hi = torch.where(sharper, hi, mid)
    return ((lo + hi) / 2).exp()


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    variant, n, d, v = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    params = json.loads(argv[4]) if len(argv) > 4 else {}
    started = time.time()
    if variant == "library":
        e, c, t = calibrated_inputs(n, d, v, dtype=torch.bfloat16, device="cpu", params=params)
    else:
        e, c, t = gen_clustered(n, d, v, **params)
    generated = time.time() - started
    stats = regime_stats(e, c, t)
    print(json.dumps({"variant": variant, "shape": [n, d, v], "params": params, "generation_s": round(generated, 1),
                      **{k: round(x, 5) for k, x in stats.items()}}), flush=True)


if __name__ == "__main__":
    main()

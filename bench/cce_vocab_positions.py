"""Where rows put their softmax in the vocabulary sorted by mean logit: real data against the generator.

For the real regime (``real PATH N``) or the calibrated generator (``calibrated N D V ['{params}']``):
regime_stats, then the share of large entries (>= 2^-12) in the first 0.1 / 1 / 10 / 50% of the sorted
vocabulary, the quantiles of each row's last large entry, and the share of (4096-column slab, row) pairs a
filtered backward keeps at 2^-12 and 2^-10 under two rules: dropping a row's longest light run of trailing
slabs (the GEMM path's rule, lmforge.cce.gemm_impl.row_depths) or its lightest slabs anywhere (the rule it
replaced). CPU, float32 logits, 512 rows at a time.

    python bench/cce_vocab_positions.py real .benchdata/real.safetensors 8192
    python bench/cce_vocab_positions.py calibrated 1024 576 49152 '{"member_decay": [0.5, 0.05]}'
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from lmforge.cce.regimes import THRESHOLD, calibrated_inputs, real_inputs, regime_stats  # noqa: E402

SLAB = 4096


def kept_shares(slab_mass: torch.Tensor, target_slab: torch.Tensor, eps: float) -> tuple[float, float]:
    """(suffix rule, lightest-anywhere rule) shares of (slab, row) pairs kept; slab_mass is (rows, slabs)."""
    n_slab = slab_mass.shape[1]
    trailing = slab_mass.flip(1).cumsum(1).flip(1)
    depth = torch.where(trailing > eps, torch.arange(1, n_slab + 1), 0).amax(1)
    suffix = torch.maximum(depth, target_slab + 1).float().mean() / n_slab
    ordered, order = torch.sort(slab_mass, dim=1)
    dropped = torch.zeros_like(slab_mass, dtype=torch.bool).scatter_(1, order, ordered.cumsum(1) <= eps)
    keep = ~dropped
    keep[torch.arange(len(target_slab)), target_slab] = True
    return float(suffix), float(keep.float().mean())


def main(argv):
    if argv[0] == "real":
        e, c, t = real_inputs(argv[1], dtype=torch.bfloat16, device="cpu", n=int(argv[2]))
        label = {"regime": "real", "rows": int(argv[2])}
    else:
        n, d, v = (int(x) for x in argv[1:4])
        params = json.loads(argv[4]) if len(argv) > 4 else {}
        e, c, t = calibrated_inputs(n, d, v, dtype=torch.bfloat16, device="cpu", params=params)
        label = {"regime": "calibrated", "shape": [n, d, v], "params": params}
    vocab = c.shape[0]
    c32 = c.float()
    order = torch.argsort(c32 @ e.float().mean(0), descending=True)
    position = torch.empty(vocab, dtype=torch.long)
    position[order] = torch.arange(vocab)
    slab_of = position // SLAB
    n_slab = -(-vocab // SLAB)
    places, last, masses = [], [], []
    for start in range(0, e.shape[0], 512):
        p = torch.softmax(e[start:start + 512].float() @ c32.T, -1)
        big = p >= THRESHOLD
        places.append(position[big.nonzero(as_tuple=True)[1]].float() / vocab)
        last.append(torch.where(big, position[None, :], -1).amax(1).float() / vocab)
        masses.append(torch.zeros(p.shape[0], n_slab).index_add_(1, slab_of, p))
    places, last, masses = torch.cat(places), torch.cat(last), torch.cat(masses)
    target_slab = slab_of[t.long()]
    out = dict(label, **{k: round(x, 5) for k, x in regime_stats(e, c, t).items()})
    out["large_entries_in_first"] = {f"{f:g}": round(float((places < f).float().mean()), 3)
                                     for f in (0.001, 0.01, 0.1, 0.5)}
    out["last_large_entry_quantiles"] = {f"{q:g}": round(float(torch.quantile(last, q)), 4) for q in (0.5, 0.9, 0.99)}
    for k in (12, 10):
        suffix, anywhere = kept_shares(masses, target_slab, 2.0 ** -k)
        out[f"kept_2^-{k}"] = {"suffix": round(suffix, 4), "lightest_anywhere": round(anywhere, 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])

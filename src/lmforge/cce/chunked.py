"""The chunked PyTorch path of Cut Cross-Entropy: exact, runs anywhere torch runs.

Both backends compute the same four per-token statistics of the logit row z_i = softcap(e_i . C^T + b):

* ``lse``          log-sum-exp over the vocabulary,
* ``target_logit`` z_i[t_i] (0 when t_i is not a vocabulary index, e.g. ignore_index),
* ``sum_logit``    sum_j z_ij (only needed for label smoothing),
* ``mean_logit``   sum_j p_ij z_ij, the softmax-weighted logit (only needed for the entropy).

and, in the backward, the same logit gradient for upstream gradients (g_lse, g_tgt, g_sum, g_mu):

    dz_ij = g_lse_i p_ij + g_tgt_i [j == t_i] + g_sum_i + g_mu_i p_ij (1 + z_ij - mu_i)

times the softcap derivative 1 - (z_ij / cap)^2. Everything else (label smoothing, z-loss, reductions,
log-probabilities, entropy) is ordinary autograd on these length-N vectors in :mod:`lmforge.cce.api`.

Here the logits are materialised one chunk of tokens at a time in float32, and recomputed in the
backward, so peak extra memory is O(chunk * V) plus, for low-precision inputs, a float32 copy of the
classifier and a float32 accumulator for its gradient (so that dC sums over chunks without bf16 rounding).
"""

from __future__ import annotations

import torch

# Elements of one float32 (chunk x V) logit buffer; a few such buffers are alive at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


def chunk_rows(n_rows: int, vocab: int, chunk_elements: int | None = None) -> int:
    budget = chunk_elements or DEFAULT_CHUNK_ELEMENTS
    return max(1, min(n_rows, budget // max(vocab, 1)))


def _logits(e_chunk: torch.Tensor, c32: torch.Tensor, bias32, softcap):
    """Logits of one chunk in the compute dtype (float32, or float64 for float64 inputs), and tanh(x / cap)
    when softcapping (for the derivative)."""
    z = e_chunk.to(c32.dtype) @ c32.t()
    if bias32 is not None:
        z += bias32
    if softcap is None:
        return z, None
    th = torch.tanh(z / softcap)
    return th * softcap, th


def forward_stats(e, c, bias, targets, *, softcap=None, need_sum=False, need_mu=False,
                  chunk_elements=None):
    """Per-token (lse, target_logit, sum_logit, mean_logit), float32, shape (N,) each.

    e: (N, D); c: (V, D); bias: (V,) or None; targets: (N,) integer, any value outside [0, V)
    contributes no target logit. Unrequested statistics come back as zeros.
    """
    n, vocab = e.shape[0], c.shape[0]
    compute = torch.float64 if e.dtype == torch.float64 else torch.float32
    c32 = c if c.dtype == compute else c.to(compute)
    bias32 = None if bias is None else bias.to(compute)
    lse = torch.empty(n, dtype=compute, device=e.device)
    target_logit = torch.zeros(n, dtype=compute, device=e.device)
    sum_logit = torch.zeros(n, dtype=compute, device=e.device)
    mean_logit = torch.zeros(n, dtype=compute, device=e.device)
    step = chunk_rows(n, vocab, chunk_elements)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        z, _ = _logits(e[rows].to(compute), c32, bias32, softcap)
        lse[rows] = torch.logsumexp(z, dim=-1)
        t = targets[rows]
        has_target = (t >= 0) & (t < vocab)
        picked = z.gather(1, t.clamp(0, vocab - 1).long().unsqueeze(1)).squeeze(1)
        target_logit[rows] = torch.where(has_target, picked, torch.zeros_like(picked))
        if need_sum:
            sum_logit[rows] = z.sum(dim=-1)
        if need_mu:
            p = torch.exp(z - lse[rows].unsqueeze(1))
            mean_logit[rows] = (p * z).sum(dim=-1)
    return lse, target_logit, sum_logit, mean_logit


def backward(e, c, bias, targets, lse, mean_logit, g_lse, g_tgt, g_sum, g_mu, *, softcap=None,
             need_de=True, need_dc=True, need_db=False, chunk_elements=None, de_dtype=None):
    """Gradients (dE, dC, db) for upstream per-token gradients of the four statistics.

    Any of g_* may be None (no gradient flows into that statistic). Exact: no filtering. dE comes back in
    ``de_dtype`` (default e's dtype), e.g. float32 for partial gradients that are summed before rounding.
    """
    n, vocab = e.shape[0], c.shape[0]
    compute = torch.float64 if e.dtype == torch.float64 else torch.float32
    c32 = c if c.dtype == compute else c.to(compute)
    bias32 = None if bias is None else bias.to(compute)
    de = torch.empty_like(e, dtype=de_dtype or e.dtype) if need_de else None
    dc_acc = torch.zeros(c.shape, dtype=compute, device=c.device) if need_dc else None
    db_acc = torch.zeros(vocab, dtype=compute, device=c.device) if need_db else None
    step = chunk_rows(n, vocab, chunk_elements)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        e_chunk = e[rows].to(compute)
        z, th = _logits(e_chunk, c32, bias32, softcap)
        p = torch.exp(z - lse[rows].to(compute).unsqueeze(1))
        dz = torch.zeros_like(z)
        if g_lse is not None:
            dz += g_lse[rows].to(compute).unsqueeze(1) * p
        if g_mu is not None:
            dz += g_mu[rows].to(compute).unsqueeze(1) * p * (1 + z - mean_logit[rows].to(compute).unsqueeze(1))
        if g_sum is not None:
            dz += g_sum[rows].to(compute).unsqueeze(1)
        if g_tgt is not None:
            t = targets[rows]
            has_target = (t >= 0) & (t < vocab)
            tgt_grad = torch.where(has_target, g_tgt[rows].to(compute), torch.zeros((), dtype=compute, device=z.device))
            dz.scatter_add_(1, t.clamp(0, vocab - 1).long().unsqueeze(1), tgt_grad.unsqueeze(1))
        if th is not None:
            dz *= 1 - th * th
        if need_de:
            de[rows] = (dz @ c32).to(de.dtype)
        if need_dc:
            dc_acc += dz.t() @ e_chunk
        if need_db:
            db_acc += dz.sum(dim=0)
    dc = None if dc_acc is None else dc_acc.to(c.dtype)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return de, dc, db

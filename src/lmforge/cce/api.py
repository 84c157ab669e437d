"""Public API of Cut Cross-Entropy: the loss and per-token log-probabilities without the logit matrix.

Data flow, for e (..., D), classifier c (V, D) and targets (...):

1. validate, flatten e to (N, D) (a view when possible) and, for ``shift=True``, shift the targets
   instead of slicing e, so e is never copied;
2. :class:`lmforge.cce.autograd.LinearStats` returns four length-N float32 statistics of each logit
   row (lse, target logit, logit sum, softmax-weighted logit), computed by Triton kernels or by the
   chunked torch path, never materialising all N x V logits;
3. the loss (NLL, label smoothing, z-loss, reductions) or log-probability / entropy is plain torch
   on those vectors, so autograd derives the per-token gradient coefficients the backward needs.

With ``process_group`` (or a DTensor classifier), step 2 runs on this rank's block of classifier rows
and the statistics are combined over the group: see :mod:`lmforge.cce.parallel`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lmforge.cce import gemm_impl, parallel, triton_impl
from lmforge.cce.autograd import LinearStats

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton", "gemm")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def auto_filter_eps(dtype: torch.dtype, preset: str = "auto") -> float | None:
    """Gradient-filter threshold used by ``filter_eps="auto"`` (and by the faster ``"fast"`` preset).

    filter_eps bounds the softmax mass each row may lose to skipped tiles or slabs, summed over all of them.
    For 16-bit inputs "auto" gives eps(dtype) / 32 (2^-12 for bfloat16, 2^-15 for float16): a change the
    gradient's own rounding hides (on the H200 tables dE's error vs float64 moves from 4.4e-3 exact to
    4.6e-3, plain torch in bf16: 8.8e-3). "fast" gives eps(dtype) / 8 (2^-10 for bfloat16), which skips
    more work for an error about that of plain torch in bf16 (7.1e-3 at the Gemma 2 shape; see
    docs/benchmarks.md). float32 and float64 inputs are not filtered: their users ask for exact gradients.
    """
    if preset not in ("auto", "fast"):
        raise ValueError(f"preset must be 'auto' or 'fast', got {preset!r}")
    if dtype in (torch.bfloat16, torch.float16):
        return torch.finfo(dtype).eps / (8 if preset == "fast" else 32)
    return None


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # On GPUs the GEMM path: fastest on the H200 (docs/benchmarks.md), as exact as the fused kernels,
        # at the price of one 128 MiB logit slab in the backward (and in the forward before Hopper);
        # impl="triton" keeps the backward's workspace smaller.
        return "gemm" if device.type == "cuda" and triton_impl.HAS_TRITON else "torch"
    if impl in ("triton", "gemm"):
        if not triton_impl.HAS_TRITON:
            raise ValueError(f"impl={impl!r} needs the triton package; install it or use impl='torch'")
        if not triton_impl.available_for(device):
            raise ValueError(f"impl={impl!r} needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                             f"interpreter); got tensors on {device}. Use impl='torch' or 'auto'.")
        if dtype == torch.float64:
            raise ValueError(f"impl={impl!r} supports float16, bfloat16 and float32; got float64 "
                             "(use impl='torch' for float64)")
    return impl


def _check_tensor(name: str, t, *, floating: bool):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _prepare(e, c, targets, bias, *, shift, ignore_index, check_targets=True):
    """Validate the public inputs; return (e2d, c, bias, flat_targets, check), where ``check()`` raises for
    targets out of range (:func:`_target_check`; call it after queuing the loss's kernels)."""
    _check_tensor("e", e, floating=True)
    _check_tensor("c", c, floating=True)
    _check_tensor("targets", targets, floating=False)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if c.dim() != 2:
        raise ValueError(f"c must be (V, D), got shape {tuple(c.shape)}")
    if e.dim() < 1 or e.shape[-1] != c.shape[1]:
        raise ValueError(f"e must be (..., D) with D = c.shape[1] = {c.shape[1]}, got shape {tuple(e.shape)}")
    if e.dtype != c.dtype:
        raise TypeError(f"e and c must have the same dtype, got e {e.dtype} and c {c.dtype}")
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise ValueError(f"targets must have shape e.shape[:-1] = {tuple(e.shape[:-1])}, got {tuple(targets.shape)}")
    devices = {("e", e.device), ("c", c.device), ("targets", targets.device)}
    if bias is not None:
        _check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (c.shape[0],):
            raise ValueError(f"bias must be (V,) = ({c.shape[0]},), got {tuple(bias.shape)}")
        devices.add(("bias", bias.device))
    if len({d for _, d in devices}) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=lambda x: x[0]))
        raise ValueError(f"all tensors must be on one device, got {where}")
    if e.numel() == 0 or c.numel() == 0:
        raise ValueError(f"empty input: e has shape {tuple(e.shape)}, c has shape {tuple(c.shape)}")

    flat_targets = targets.reshape(-1)
    if shift:
        if e.dim() < 2 or e.shape[-2] < 2:
            raise ValueError(f"shift=True needs e of shape (..., T, D) with T >= 2, got {tuple(e.shape)}")
        # Position t predicts token t+1: shift the (cheap) targets, not the (large) hidden states.
        pad = torch.full_like(targets[..., :1], ignore_index)
        flat_targets = torch.cat([targets[..., 1:], pad], dim=-1).reshape(-1)
    flat_targets = flat_targets.contiguous()
    check = _target_check(flat_targets, c.shape[0], ignore_index) if check_targets else _no_check
    e2d = e.reshape(-1, e.shape[-1])
    return e2d, c, bias, flat_targets, check


def _no_check():
    """The check of calls whose targets need none here (checked on the CPU already, or by the shard)."""


def _target_check(flat_targets, vocab, ignore_index):
    """A function that reports targets neither in [0, vocab) nor ignore_index.

    On the CPU the test runs here and raises a ValueError. On CUDA the returned function, called once the
    loss's kernels are queued (they treat such targets as absent), queues the test as an asynchronous
    device-side assertion, as torch's own cross_entropy does on CUDA: a failure surfaces at the next
    synchronisation as a CUDA error ("device-side assert triggered") and leaves the CUDA context unusable.
    Reading the answer back instead stalls the host once per call: on the H200 at the SmolLM2 shape that
    cost 0.2 ms of a 2.1 ms forward and 0.6 ms of a 6.9 ms forward+backward (bench/cce_sync_probe.py), as
    the backward's launches could no longer run ahead of the GPU. ``LMFORGE_CCE_SYNC_CHECK=1`` restores the
    read-back and the ValueError on CUDA (debugging).
    """

    def bad_targets():
        return (flat_targets != ignore_index) & ((flat_targets < 0) | (flat_targets >= vocab))

    def check_sync():
        bad = bad_targets()
        n_bad = int(bad.sum())
        if n_bad:
            raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"found {int(flat_targets[bad][0])} ({n_bad} bad entries)")

    def check_async():
        torch._assert_async(~bad_targets().any(), f"lmforge: targets must lie in [0, {vocab}) or equal "
                                                   f"ignore_index={ignore_index}")

    if not flat_targets.is_cuda:
        check_sync()
        return _no_check
    return check_sync if os.environ.get("LMFORGE_CCE_SYNC_CHECK", "0") not in ("", "0") else check_async


def _prepare_operands(e, c, targets, bias, *, shift, ignore_index, process_group, vocab_start):
    """:func:`_prepare` for single-device and vocabulary-parallel calls; returns (e2d, c, bias, flat_targets,
    shard, check), with ``shard`` None on a single device, else this rank's :class:`~lmforge.cce.parallel.VocabShard`
    (c and bias are then this rank's rows; the shard's construction has checked the targets)."""
    e, c, targets, bias, process_group = parallel.local_operands(e, c, targets, bias, process_group, vocab_start)
    if process_group is None:
        e2d, c, bias, flat_t, check = _prepare(e, c, targets, bias, shift=shift, ignore_index=ignore_index)
        return e2d, c, bias, flat_t, None, check
    # Validation errors of one rank are raised on every rank (after the shared all-gather), never a hang.
    device = next((t.device for t in (e, c, targets) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    prepared, error = None, None
    try:
        e2d, c, bias, flat_t, _ = _prepare(e, c, targets, bias, shift=shift, ignore_index=ignore_index,
                                           check_targets=False)
        prepared = (e2d, flat_t)
    except (TypeError, ValueError) as err:
        error = err
    rows = c.shape[0] if prepared is not None else 0
    shard = parallel.vocab_shard(prepared, error, rows, process_group, vocab_start, ignore_index, device)
    return e2d, c, bias, flat_t, shard, _no_check


def _unflatten(per_token: torch.Tensor, targets_shape, shift):
    x = per_token.view(targets_shape)
    return x[..., :-1] if shift else x


def _check_options(reduction, label_smoothing, z_loss, softcap, filter_eps):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if float(z_loss) < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not (filter_eps is None or filter_eps in ("auto", "fast") or
            (isinstance(filter_eps, (int, float)) and not isinstance(filter_eps, bool) and filter_eps >= 0)):
        raise ValueError(f"filter_eps must be 'auto', 'fast', None or a number >= 0, got {filter_eps!r}")


def _stats(e2d, c, bias, flat_targets, *, softcap, need_sum, need_mu, filter_eps, impl, shard=None,
           ignore_index=-100):
    impl = _resolve_impl(impl, e2d.device, e2d.dtype)
    eps = filter_eps
    if filter_eps in ("auto", "fast"):
        eps = auto_filter_eps(e2d.dtype, filter_eps)
        if impl == "gemm" and not gemm_impl.presets_filter(e2d.shape[0], c.shape[0]):
            eps = None
    if eps == 0:
        eps = None
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (e2d, c, bias))):
        # No backward will run (inference, log-probabilities, no_grad): filtering would only add the sorted
        # order's cost to the forward. (Inside the autograd Function grad mode is always off, so it is
        # decided here.)
        eps = None
    softcap = None if softcap is None else float(softcap)
    if shard is not None:
        return parallel.vocab_parallel_stats(e2d, c, bias, flat_targets, shard, ignore_index=ignore_index,
                                             softcap=softcap, need_sum=need_sum, need_mu=need_mu,
                                             filter_eps=eps, impl=impl)
    return LinearStats.apply(e2d, c, bias, flat_targets, softcap, need_sum, need_mu, eps, impl)


def linear_cross_entropy(e, c, targets, *, bias=None, ignore_index=-100, softcap=None,
                         reduction="mean", shift=False, label_smoothing=0.0, z_loss=0.0,
                         return_lse=False, filter_eps="auto", impl="auto", process_group=None,
                         vocab_start=None):
    """Cross-entropy of softmax(softcap(e @ c.T + bias)) against targets, without the logit matrix.

    Args:
        e: (..., D) hidden states (float16, bfloat16, float32; float64 with impl="torch").
        c: (V, D) classifier (lm_head weight), same dtype as e.
        targets: (...) integer token ids; entries equal to ``ignore_index`` are skipped. Any other entry
            outside [0, V) raises a ValueError on the CPU; on CUDA it trips an asynchronous device-side
            assertion, as torch's cross_entropy does (``LMFORGE_CCE_SYNC_CHECK=1``: a ValueError there too,
            at the cost of one host synchronisation per call).
        bias: optional (V,) classifier bias.
        softcap: if set, logits become softcap * tanh(logits / softcap) (Gemma 2 final-logit capping).
        reduction: "mean" over non-ignored tokens, "sum", or "none" (per-token losses, 0 where ignored).
        shift: position t predicts targets[..., t + 1] (causal LM labels); e is not copied.
        label_smoothing: epsilon of torch.nn.functional.cross_entropy's label smoothing.
        z_loss: adds z_loss * lse^2 per token (PaLM's auxiliary loss).
        return_lse: also return the per-token log-sum-exp (shape of the per-token loss).
        filter_eps: gradient filtering: the softmax mass each row may lose to skipped work. "auto" picks it
            from the dtype (2^-12 for bfloat16, none for float32; see :func:`auto_filter_eps`), "fast" a
            larger one (2^-10 for bfloat16: faster, dE error about plain torch's in bf16), None computes exact
            gradients, a number sets it. "triton" skips logit tiles; "gemm" skips each row's lightest
            trailing vocabulary slabs, from hidden size ``gemm_impl.FILTER_MIN_D`` (1024) up, and runs exact
            where rows would keep most of the work; under the presets only at the token counts where that
            was measured to pay (``gemm_impl.presets_filter``: 8192+ tokens); "torch" is always exact.
        impl: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "gemm" (the vocabulary in
            slabs of ``LMFORGE_CCE_SLAB_MB`` (128) MiB of fp32 logits, cuBLAS products for dE and dC; on
            Hopper TMA-fed Triton kernels form the forward's statistics and each slab's dz without the fp32
            slab, elsewhere cuBLAS writes it and Triton passes read it; faster on the H200; see
            :mod:`lmforge.cce.gemm_impl`), "torch" (chunked, exact, any device) or "auto" ("gemm" on CUDA,
            "torch" elsewhere).
        process_group: vocabulary parallelism (:mod:`lmforge.cce.parallel`): ``c`` (and ``bias``) hold this
            rank's block of classifier rows, ``e`` and ``targets`` (global ids) are the same on every rank of
            the group; loss and dE equal the single-device ones on every rank, dC is this block's rows.
            Every rank must call (and backpropagate) together.
        vocab_start: the global row of ``c[0]`` (with process_group); None = blocks in rank order, each
            rank's starting where the previous rank's ends (uneven blocks allowed).

    A ``c`` that is a DTensor split by rows (``Shard(0)``) on a 1-D mesh runs vocabulary-parallel over its
    mesh; other DTensor layouts are gathered with ``full_tensor()`` (V x D memory on every rank).

    Returns:
        The loss (float32), and with ``return_lse`` a tuple (loss, lse). A batch whose targets are all
        ignored gives loss 0 (not NaN) and zero gradients for every reduction.
    """
    _check_options(reduction, label_smoothing, z_loss, softcap, filter_eps)
    e2d, c, bias, flat_t, shard, check = _prepare_operands(e, c, targets, bias, shift=shift,
                                                           ignore_index=ignore_index, process_group=process_group,
                                                           vocab_start=vocab_start)
    vocab = c.shape[0] if shard is None else shard.vocab
    lse, target_logit, sum_logit, _ = _stats(e2d, c, bias, flat_t, softcap=softcap,
                                             need_sum=label_smoothing > 0, need_mu=False,
                                             filter_eps=filter_eps, impl=impl, shard=shard,
                                             ignore_index=ignore_index)
    check()
    valid = flat_t != ignore_index
    loss = lse - target_logit
    if label_smoothing > 0:
        # torch's definition: (1 - eps) * nll + eps * mean_j(-log p_j) = (1 - eps) * nll + eps * (lse - mean_j z_j)
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - sum_logit / vocab)
    if z_loss > 0:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        out = _unflatten(loss, targets.shape, shift)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / valid.sum().clamp(min=1)
    if return_lse:
        return out, _unflatten(lse, targets.shape, shift)
    return out


def token_logprobs(e, c, targets, *, bias=None, softcap=None, shift=False, ignore_index=-100,
                   return_entropy=False, filter_eps="auto", impl="auto", process_group=None, vocab_start=None):
    """Differentiable log p(target) per token (0 where ignored), without the logit matrix.

    With ``return_entropy`` also returns the per-token entropy of the predicted distribution
    (0 where the target is ignored), differentiable as well. Shapes are those of targets
    (the last dimension one shorter with ``shift=True``). Values are float32. ``process_group`` and
    ``vocab_start`` (and DTensor classifiers) work as in :func:`linear_cross_entropy`.
    """
    _check_options("none", 0.0, 0.0, softcap, filter_eps)
    e2d, c, bias, flat_t, shard, check = _prepare_operands(e, c, targets, bias, shift=shift,
                                                           ignore_index=ignore_index, process_group=process_group,
                                                           vocab_start=vocab_start)
    lse, target_logit, _, mean_logit = _stats(e2d, c, bias, flat_t, softcap=softcap, need_sum=False,
                                              need_mu=return_entropy, filter_eps=filter_eps, impl=impl,
                                              shard=shard, ignore_index=ignore_index)
    check()
    valid = flat_t != ignore_index
    zero = torch.zeros_like(lse)
    logp = _unflatten(torch.where(valid, target_logit - lse, zero), targets.shape, shift)
    if not return_entropy:
        return logp
    entropy = _unflatten(torch.where(valid, lse - mean_logit, zero), targets.shape, shift)
    return logp, entropy


class LinearCrossEntropy(nn.Module):
    """Module form of :func:`linear_cross_entropy`; ``forward(e, c, targets, bias=None)``."""

    def __init__(self, *, ignore_index=-100, softcap=None, reduction="mean", shift=False,
                 label_smoothing=0.0, z_loss=0.0, return_lse=False, filter_eps="auto", impl="auto",
                 process_group=None, vocab_start=None):
        super().__init__()
        _check_options(reduction, label_smoothing, z_loss, softcap, filter_eps)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.options = dict(ignore_index=ignore_index, softcap=softcap, reduction=reduction, shift=shift,
                            label_smoothing=label_smoothing, z_loss=z_loss, return_lse=return_lse,
                            filter_eps=filter_eps, impl=impl, process_group=process_group,
                            vocab_start=vocab_start)

    def forward(self, e, c, targets, bias=None):
        return linear_cross_entropy(e, c, targets, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

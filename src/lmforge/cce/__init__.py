"""Cut Cross-Entropy: the language-model loss without the tokens x vocabulary logit matrix.

``linear_cross_entropy(e, c, targets)`` equals ``F.cross_entropy(e @ c.T, targets)`` but computes
it from tiles that never leave the chip (Triton, on CUDA) or from token chunks (torch, anywhere).
``token_logprobs`` gives per-token log-probabilities (and entropies) the same way; lmforge uses it
for every log-probability it needs.
"""

from lmforge.cce.api import LinearCrossEntropy, auto_filter_eps, linear_cross_entropy, token_logprobs
from lmforge.cce.patch import is_patched, patch, unpatch

__all__ = ["LinearCrossEntropy", "auto_filter_eps", "is_patched", "linear_cross_entropy", "patch",
           "token_logprobs", "unpatch"]

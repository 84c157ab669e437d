"""Merge methods for LoRA adapters: a registry of small functions, and one entry point.

GENOME / GENOME+ crossover merges parent adapters into a child. :func:`merge_adapters` takes a list of
adapter state dicts (same keys, shapes and dtypes), one weight per adapter, and a method name:

    merged = base + scaling * method(task_vectors, weights)      task_vector_i = adapter_i - base

``base`` is optional (absent means zero, so the task vectors are the adapters themselves). With x_i the
task vectors, w_i the weights and d the density, the registered methods are:

===================== ====================================================== ====================
name                  formula (per tensor, entrywise unless said)            PEFT equivalent
===================== ====================================================== ====================
linear                sum_i w_i x_i / sum_i w_i                              task_arithmetic with
                                                                             w / sum(w)
task_arithmetic       sum_i w_i x_i                                          task_arithmetic
magnitude_prune       sum_i w_i trim(x_i)                                    magnitude_prune
ties                  disjoint mean of w_i trim(x_i) over the elected sign   ties ("total" sign)
dare_linear           sum_i w_i drop(x_i) / sum_i w_i                        dare_linear with
                                                                             w / sum(w)
dare_task_arithmetic  sum_i w_i drop(x_i)                                    dare_linear
dare_ties             disjoint mean of w_i drop(x_i) over the elected sign   dare_ties ("total")
===================== ====================================================== ====================

* trim(x) keeps the k = floor(d * numel) entries of largest |x| in each tensor (ties at the cut are
  broken by ``torch.topk``) and zeroes the rest.
* drop(x) = x * m / d with m_j ~ Bernoulli(d): each entry is dropped with probability 1 - d and the
  survivors are rescaled so that E[drop(x)] = x (DARE). Masks come from ``generator`` (torch's
  global RNG when None), drawn with ``torch.bernoulli`` in the same order as PEFT draws them, so a
  generator seeded like the global RNG before a PEFT call reproduces PEFT's masks.
* The elected sign of an entry is the sign of sum_i y_i over the pruned, *unweighted* values y_i
  (a zero sum elects +); the disjoint mean averages w_i y_i over the adapters whose y_i has that
  sign (pruned zeros never count), and is 0 where none does. This is PEFT's TIES; mergekit instead
  elects on the weighted values and divides by the agreeing weights, which differs when the
  weights are unequal.
* density d must lie in (0, 1]; d = 1 keeps everything and is ignored by linear / task_arithmetic.

Our "linear" is a weighted *average* (as in mergekit), so the "_linear" names normalise by sum(w)
while the "_task_arithmetic" names do not; PEFT's own ``dare_linear`` does not normalise.

Where the merge happens (``space``):

* ``"factors"`` (default, as the GENOME paper does): every tensor, lora_A and lora_B alike, is merged
  on its own; the result has the input's keys and shapes.
* ``"delta"``: each LoRA pair is turned into its product dW_i = B_i @ A_i, the products are merged,
  and the result maps the module name (the key up to ``.lora_A.``) to the merged dW (out, in).
  The PEFT factor lora_alpha / r is *not* applied: it lives in the adapter config, not the weights.
* ``"delta_svd"``: as ``"delta"``, then dW is re-factorised by truncated SVD at ``rank`` (default:
  the input rank) into B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, the best rank-r approximation with
  equally sized factors; the result has the input's keys. If the rank changes, keep
  lora_alpha / r fixed in the config, or PEFT will rescale the adapter's effect.

In both delta spaces, keys outside lora_A / lora_B pairs (biases, magnitude vectors,
modules_to_save) are merged on their own, as in ``"factors"``.

Arithmetic is float32 (float64 for float64 inputs) and results come back in the input dtype.
Custom methods join the registry with :func:`register_merge_method`; see :data:`MergeMethod`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

# A merge method maps stacked task vectors (n, *shape) and weights (n,), both in the compute dtype,
# plus density and generator (keywords, unused by methods that don't prune), to one tensor (*shape).
MergeMethod = Callable[..., torch.Tensor]

_MERGE_METHODS: dict[str, MergeMethod] = {}

SPACES = ("factors", "delta", "delta_svd")


def register_merge_method(name: str) -> Callable[[MergeMethod], MergeMethod]:
    """Decorator adding a merge method to the registry under ``name``.

    The function is called as ``fn(task_vectors, weights, density=..., generator=...)`` with
    task_vectors of shape (n, *shape) and weights of shape (n,), and returns a tensor of *shape.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"merge method name must be a non-empty string, got {name!r}")

    def add(fn: MergeMethod) -> MergeMethod:
        if name in _MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        _MERGE_METHODS[name] = fn
        return fn

    return add


def merge_method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_MERGE_METHODS)


def get_merge_method(name: str) -> MergeMethod:
    """The merge method registered under ``name``; ValueError listing the known names otherwise."""
    if name not in _MERGE_METHODS:
        raise ValueError(f"unknown merge method {name!r}; known methods: {', '.join(merge_method_names())}")
    return _MERGE_METHODS[name]


# ---------------------------------------------------------------------------------------------
# Building blocks: pruning, sign election, weighted sums. All take stacked (n, *shape) tensors.


def _per_adapter(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """weights (n,) viewed as (n, 1, ..., 1) so it broadcasts over one adapter's tensor."""
    return weights.view(-1, *([1] * (like.dim() - 1)))


def _weighted_sum(task_vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (task_vectors * _per_adapter(weights, task_vectors)).sum(dim=0)


def _normalised(weights: torch.Tensor, method: str) -> torch.Tensor:
    total = weights.sum()
    if total == 0:
        raise ValueError(f"{method} divides by the sum of the weights, which is 0; "
                         f"got weights {weights.tolist()}")
    return weights / total


def keep_top_magnitude(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """trim(x_i): keep the floor(density * numel) entries of largest |x| of each adapter's tensor."""
    if density >= 1:
        return task_vectors
    trimmed = []
    for x in task_vectors:  # one top-k per adapter, as PEFT does, so ties at the cut break the same way
        keep = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
        keep[x.abs().reshape(-1).topk(int(density * x.numel())).indices] = 1
        trimmed.append(x * keep.view(x.shape))
    return torch.stack(trimmed)


def drop_and_rescale(task_vectors: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """drop(x_i) = x_i * m / density, m ~ Bernoulli(density) entrywise (DARE).

    One draw over the stacked tensor consumes the generator exactly as PEFT's per-adapter draws do.
    """
    if density >= 1:
        return task_vectors
    keep = torch.bernoulli(torch.full_like(task_vectors, density), generator=generator)
    return task_vectors * keep / density


def sign_elected_mean(pruned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' elect + disjoint merge: mean of w_i y_i over the i whose sign matches sign(sum_i y_i)."""
    elected = torch.where(pruned.sum(dim=0) >= 0, 1.0, -1.0).to(pruned.dtype)
    agrees = pruned.sign() == elected
    weighted = pruned * _per_adapter(weights, pruned)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


# ---------------------------------------------------------------------------------------------
# The registered methods. Each docstring gives its formula; x_i are task vectors, w_i weights.


@register_merge_method("linear")
def linear(task_vectors, weights, *, density=1.0, generator=None):
    """sum_i w_i x_i / sum_i w_i (weighted average; density and generator unused)."""
    return _weighted_sum(task_vectors, _normalised(weights, "linear"))


@register_merge_method("task_arithmetic")
def task_arithmetic(task_vectors, weights, *, density=1.0, generator=None):
    """sum_i w_i x_i (density and generator unused)."""
    return _weighted_sum(task_vectors, weights)


@register_merge_method("magnitude_prune")
def magnitude_prune(task_vectors, weights, *, density=1.0, generator=None):
    """sum_i w_i trim(x_i): keep the top-|x| fraction `density` of each tensor, then sum."""
    return _weighted_sum(keep_top_magnitude(task_vectors, density), weights)


@register_merge_method("ties")
def ties(task_vectors, weights, *, density=1.0, generator=None):
    """TIES: y_i = trim(x_i); sign s = sign(sum_i y_i); mean of w_i y_i over i with sign(y_i) = s."""
    return sign_elected_mean(keep_top_magnitude(task_vectors, density), weights)


@register_merge_method("dare_linear")
def dare_linear(task_vectors, weights, *, density=1.0, generator=None):
    """sum_i w_i drop(x_i) / sum_i w_i, drop(x) = x * Bernoulli(density) / density."""
    return _weighted_sum(drop_and_rescale(task_vectors, density, generator), _normalised(weights, "dare_linear"))


@register_merge_method("dare_task_arithmetic")
def dare_task_arithmetic(task_vectors, weights, *, density=1.0, generator=None):
    """sum_i w_i drop(x_i), drop(x) = x * Bernoulli(density) / density."""
    return _weighted_sum(drop_and_rescale(task_vectors, density, generator), weights)


@register_merge_method("dare_ties")
def dare_ties(task_vectors, weights, *, density=1.0, generator=None):
    """TIES with drop(x_i) in place of trim(x_i): sign-elected mean of w_i drop(x_i)."""
    return sign_elected_mean(drop_and_rescale(task_vectors, density, generator), weights)


# ---------------------------------------------------------------------------------------------
# The entry point: validation, task vectors, the merge space, dtypes.


def _check_adapter(adapter, reference: Mapping[str, torch.Tensor], label: str) -> None:
    """Same keys, shapes, dtypes and devices as the reference adapter; errors name the key."""
    if not isinstance(adapter, Mapping):
        raise TypeError(f"{label} must be a mapping of parameter names to tensors, got {type(adapter).__name__}")
    missing = [k for k in reference if k not in adapter]
    extra = [k for k in adapter if k not in reference]
    if missing or extra:
        raise ValueError(f"{label} has different keys from state_dicts[0]: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for key, ref in reference.items():
        t = adapter[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label}[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{label}[{key!r}] must be a floating-point tensor, got {t.dtype}")
        if t.shape != ref.shape:
            raise ValueError(f"{label}[{key!r}] has shape {tuple(t.shape)}, expected {tuple(ref.shape)} "
                             "as in state_dicts[0]")
        if t.dtype != ref.dtype:
            raise ValueError(f"{label}[{key!r}] has dtype {t.dtype}, expected {ref.dtype} as in state_dicts[0]")
        if t.device != ref.device:
            raise ValueError(f"{label}[{key!r}] is on {t.device}, expected {ref.device} as in state_dicts[0]")


def _lora_pairs(keys: Sequence[str], space: str) -> dict[str, tuple[str, str]]:
    """module name -> (lora_A key, lora_B key) for every ``<module>.lora_A.<rest>`` key."""
    pairs = {}
    for key in keys:
        if ".lora_A." not in key:
            continue
        module, rest = key.split(".lora_A.", 1)
        b_key = f"{module}.lora_B.{rest}"
        if b_key not in keys:
            raise ValueError(f"space={space!r} pairs {key!r} with {b_key!r}, which is not in the state dicts")
        pairs[module] = (key, b_key)
    if not pairs:
        raise ValueError(f"space={space!r} needs LoRA keys of the form '<module>.lora_A.<...>' and "
                         "'<module>.lora_B.<...>'; none found")
    return pairs


def _lora_product(adapter: Mapping[str, torch.Tensor], a_key: str, b_key: str) -> torch.Tensor:
    """B @ A in float32 (float64 for float64 factors)."""
    a, b = adapter[a_key], adapter[b_key]
    compute = torch.promote_types(a.dtype, torch.float32)
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"delta spaces need 2-D LoRA factors with lora_B (out, r) @ lora_A (r, in); "
                         f"got {a_key!r} {tuple(a.shape)} and {b_key!r} {tuple(b.shape)}")
    return b.to(compute) @ a.to(compute)


def _low_rank_factors(delta: torch.Tensor, rank: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of delta; sqrt(S) goes to each side."""
    if rank > min(delta.shape):
        raise ValueError(f"rank={rank} exceeds min(out, in)={min(delta.shape)} of module {module!r}")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root_s = s[:rank].sqrt()
    return root_s[:, None] * vh[:rank], u[:, :rank] * root_s


def _check_arguments(state_dicts, weights, base, density, scaling, space, rank) -> None:
    if isinstance(state_dicts, Mapping) or not isinstance(state_dicts, Sequence) or len(state_dicts) == 0:
        raise TypeError("state_dicts must be a non-empty list of adapter state dicts")
    for i, adapter in enumerate(state_dicts):
        _check_adapter(adapter, state_dicts[0], f"state_dicts[{i}]")
    if base is not None:
        _check_adapter(base, state_dicts[0], "base")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a list of floats, got {type(weights).__name__}")
    if len(weights) != len(state_dicts):
        raise ValueError(f"weights has {len(weights)} entries but {len(state_dicts)} state_dicts were given")
    if not all(math.isfinite(float(w)) for w in weights):
        raise ValueError(f"weights must be finite, got {list(weights)}")
    for name, value in (("density", density), ("scaling", scaling)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    bad_rank = isinstance(rank, bool) or not isinstance(rank, int) or rank < 1
    if rank is not None and (space != "delta_svd" or bad_rank):
        raise ValueError(f"rank must be a positive int and is only used with space='delta_svd'; "
                         f"got rank={rank!r} with space={space!r}")


@torch.no_grad()
def merge_adapters(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    method: str = "linear",
    *,
    density: float = 1.0,
    base: Mapping[str, torch.Tensor] | None = None,
    scaling: float = 1.0,
    generator: torch.Generator | None = None,
    space: str = "factors",
    rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """Merge adapter state dicts: ``base + scaling * method(adapter_i - base, weights)``.

    Args:
        state_dicts: adapters with the same keys, shapes, dtypes and device (PEFT key names for the
            delta spaces: ``<module>.lora_A.<...>`` / ``<module>.lora_B.<...>``).
        weights: one float per adapter.
        method: a registered name, see :func:`merge_method_names`.
        density: fraction kept by the pruning methods, in (0, 1]; 1 keeps everything.
        base: optional adapter the task vectors are taken relative to (same keys, shapes, dtypes).
        scaling: lambda multiplying the merged task vector before the base is added back.
        generator: RNG for DARE masks (None: torch's global RNG); masks are drawn key by key in
            the order of ``state_dicts[0]`` (module by module in the delta spaces).
        space: "factors" (merge lora_A and lora_B separately), "delta" (merge B @ A, return
            {module: dW}) or "delta_svd" (merge B @ A, re-factorise at ``rank``); see the module doc.
        rank: rank of the re-factorised LoRA, only with space="delta_svd"; default the input rank.

    Returns:
        A new dict of tensors in the input dtype, on the input device, without autograd history.
    """
    _check_arguments(state_dicts, weights, base, density, scaling, space, rank)
    merge_fn = get_merge_method(method)
    reference = state_dicts[0]
    device = next(iter(reference.values())).device if reference else torch.device("cpu")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the adapters are on {device}")
    weight_values = torch.tensor([float(w) for w in weights], dtype=torch.float64, device=device)

    def merge_stack(tensors: list[torch.Tensor], base_tensor: torch.Tensor | None) -> torch.Tensor:
        """base + scaling * method(tensors - base); float32 arithmetic, float64 kept for float64."""
        compute = torch.promote_types(tensors[0].dtype, torch.float32)
        task_vectors = torch.stack([t.to(compute) for t in tensors])
        if base_tensor is not None:
            task_vectors = task_vectors - base_tensor.to(compute)
        merged = merge_fn(task_vectors, weight_values.to(compute), density=density, generator=generator)
        if scaling != 1:
            merged = merged * scaling
        if base_tensor is not None:
            merged = merged + base_tensor.to(compute)
        return merged

    pairs = _lora_pairs(list(reference), space) if space != "factors" else {}
    module_of_a_key = {a_key: module for module, (a_key, _) in pairs.items()}
    b_keys = {b_key for _, b_key in pairs.values()}
    merged: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        if key in b_keys:
            continue  # merged together with its lora_A
        if key not in module_of_a_key:
            base_tensor = None if base is None else base[key]
            merged[key] = merge_stack([sd[key] for sd in state_dicts], base_tensor).to(ref.dtype)
            continue
        module = module_of_a_key[key]
        a_key, b_key = pairs[module]
        products = [_lora_product(sd, a_key, b_key) for sd in state_dicts]
        delta = merge_stack(products, None if base is None else _lora_product(base, a_key, b_key))
        if space == "delta":
            merged[module] = delta.to(ref.dtype)
        else:
            a, b = _low_rank_factors(delta, rank or ref.shape[0], module)
            merged[a_key], merged[b_key] = a.to(ref.dtype), b.to(ref.dtype)
    return merged

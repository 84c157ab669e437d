"""Merge methods against PEFT's merge utilities, hand-computed float64 answers, and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.utils import merge_utils

from lmforge.evolve import merge
from lmforge.evolve.merge import get_merge_method, merge_adapters, merge_method_names, register_merge_method

ALL_METHODS = ["dare_linear", "dare_task_arithmetic", "dare_ties", "linear", "magnitude_prune", "task_arithmetic",
               "ties"]
RANDOM_METHODS = ["dare_linear", "dare_task_arithmetic", "dare_ties"]

# Shapes of a small two-module LoRA (r = 4) plus one tensor outside any LoRA pair.
ADAPTER_SHAPES = {
    "base_model.model.q.lora_A.weight": (4, 16),
    "base_model.model.q.lora_B.weight": (12, 4),
    "base_model.model.v.lora_A.weight": (4, 16),
    "base_model.model.v.lora_B.weight": (8, 4),
    "base_model.model.norm.weight": (12,),
}


def random_adapter(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            for key, shape in ADAPTER_SHAPES.items()}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# PEFT's merge_utils on the same tensors, key by key.

# Our method -> the PEFT function computing the same thing on a list of tensors.
PEFT_EQUIVALENT = {
    "task_arithmetic": lambda ts, w, d: merge_utils.task_arithmetic(ts, w),
    "linear": lambda ts, w, d: merge_utils.task_arithmetic(ts, w / w.sum()),
    "magnitude_prune": lambda ts, w, d: merge_utils.magnitude_prune(ts, w, d),
    "ties": lambda ts, w, d: merge_utils.ties(ts, w, d, majority_sign_method="total"),
    "dare_task_arithmetic": lambda ts, w, d: merge_utils.dare_linear(ts, w, d),
    "dare_linear": lambda ts, w, d: merge_utils.dare_linear(ts, w / w.sum(), d),
    "dare_ties": lambda ts, w, d: merge_utils.dare_ties(ts, w, d, majority_sign_method="total"),
}


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("density", [0.3, 0.75])
@pytest.mark.parametrize("weights", [[0.7, 0.2, 1.1], [1.0, -0.6, 0.9]])
def test_factor_merge_matches_peft_merge_utils(method, density, weights):
    adapters = [random_adapter(s) for s in (1, 2, 3)]
    w = torch.tensor(weights)
    # PEFT draws DARE masks from the global RNG, key after key; we draw from a generator seeded alike.
    torch.manual_seed(1234)
    expected = {k: PEFT_EQUIVALENT[method]([a[k] for a in adapters], w, density) for k in ADAPTER_SHAPES}
    got = merge_adapters(adapters, weights, method, density=density, generator=seeded(1234))
    assert list(got) == list(ADAPTER_SHAPES)
    for key in ADAPTER_SHAPES:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
def test_delta_merge_matches_peft_merge_utils_on_products(method):
    adapters = [random_adapter(s) for s in (4, 5)]
    weights = [0.8, 0.5]
    torch.manual_seed(99)
    expected = {}
    for module in ("base_model.model.q", "base_model.model.v"):
        products = [a[f"{module}.lora_B.weight"] @ a[f"{module}.lora_A.weight"] for a in adapters]
        expected[module] = PEFT_EQUIVALENT[method](products, torch.tensor(weights), 0.4)
    got = merge_adapters(adapters, weights, method, density=0.4, generator=seeded(99), space="delta")
    assert set(got) == {"base_model.model.q", "base_model.model.v", "base_model.model.norm.weight"}
    for module, delta in expected.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# PEFT's whole add_weighted_adapter on a tiny model: key order, RNG order and the LoRA scaling.


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(16, 12)
        self.v = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.q(x), self.v(x)


def peft_model_with_adapters(names, r=4, alpha=8):
    torch.manual_seed(0)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "v"])
    model = get_peft_model(TinyModel(), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    g = seeded(7)
    for param_name, param in model.named_parameters():
        if "lora_" in param_name:
            param.data = torch.randn(param.shape, generator=g)
    adapters = [get_peft_model_state_dict(model, adapter_name=name) for name in names]
    return model, adapters


def peft_weighted_merge(model, names, weights, combination_type, density, seed, monkeypatch):
    """PEFT's merged adapter state dict, with the global RNG seeded just before the merging starts."""
    lora_model = model.base_model
    inject = lora_model.inject_adapter

    def inject_then_seed(*args, **kwargs):
        # Injecting the new adapter initialises it from the global RNG; seed after that, not before.
        inject(*args, **kwargs)
        torch.manual_seed(seed)

    monkeypatch.setattr(lora_model, "inject_adapter", inject_then_seed)
    lora_model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type,
                                    density=density)
    return get_peft_model_state_dict(model, adapter_name="merged")


@pytest.mark.parametrize(("ours", "peft_name"), [("task_arithmetic", "linear"), ("ties", "ties"),
                                                 ("dare_task_arithmetic", "dare_linear"), ("dare_ties", "dare_ties"),
                                                 ("magnitude_prune", "magnitude_prune")])
def test_factor_merge_matches_peft_add_weighted_adapter(ours, peft_name, monkeypatch):
    names = ["p1", "p2", "p3"]
    model, adapters = peft_model_with_adapters(names)
    weights, lora_scaling = [0.5, 1.5, 0.25], 8 / 4
    expected = peft_weighted_merge(model, names, weights, peft_name, 0.5, seed=321, monkeypatch=monkeypatch)
    # PEFT weighs both factors by sqrt(w * lora_alpha / r), so that B @ A is weighted by w.
    factor_weights = [math.sqrt(w * lora_scaling) for w in weights]
    got = merge_adapters(adapters, factor_weights, ours, density=0.5, generator=seeded(321))
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize(("ours", "peft_name"), [("task_arithmetic", "svd"), ("ties", "ties_svd"),
                                                 ("dare_task_arithmetic", "dare_linear_svd")])
def test_delta_svd_merge_matches_peft_svd_merge(ours, peft_name, monkeypatch):
    names = ["p1", "p2", "p3"]
    model, adapters = peft_model_with_adapters(names)
    weights, lora_scaling = [0.5, 1.5, 0.25], 8 / 4
    expected = peft_weighted_merge(model, names, weights, peft_name, 0.5, seed=11, monkeypatch=monkeypatch)
    got = merge_adapters(adapters, weights, ours, density=0.5, generator=seeded(11), space="delta_svd")
    for module in ("base_model.model.q", "base_model.model.v"):
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        assert got[a_key].shape == expected[a_key].shape and got[b_key].shape == expected[b_key].shape
        # PEFT's merged adapter has lora_alpha = r (scaling 1) and puts S on B; ours splits sqrt(S) and
        # leaves the adapters' scaling out, so compare the products. Every method here is
        # positively homogeneous, so scaling before or after merging is the same.
        torch.testing.assert_close(lora_scaling * got[b_key] @ got[a_key], expected[b_key] @ expected[a_key],
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Hand-computed answers in float64.

F64 = dict(dtype=torch.float64)


def one_tensor_adapters(*rows):
    return [{"w": torch.tensor(row, **F64)} for row in rows]


def test_linear_is_the_weighted_average():
    got = merge_adapters(one_tensor_adapters([1.0, 2.0], [3.0, 6.0]), [1.0, 3.0], "linear")
    # (1*1 + 3*3) / 4 = 2.5, (1*2 + 3*6) / 4 = 5
    torch.testing.assert_close(got["w"], torch.tensor([2.5, 5.0], **F64), rtol=0, atol=1e-15)


def test_task_arithmetic_with_base_and_scaling():
    base = {"w": torch.tensor([1.0, 1.0], **F64)}
    adapters = one_tensor_adapters([2.0, 3.0], [0.0, 5.0])
    got = merge_adapters(adapters, [1.0, 0.5], "task_arithmetic", base=base, scaling=2.0)
    # task vectors [1, 2] and [-1, 4]; weighted sum [0.5, 4]; times 2 is [1, 8]; plus base is [2, 9]
    torch.testing.assert_close(got["w"], torch.tensor([2.0, 9.0], **F64), rtol=0, atol=1e-15)


# Two adapters without ties in |x|: at density 0.5 each keeps its 2 largest-magnitude entries.
#   x1 = [3, -1, 0.5, -2]    -> trimmed [3, 0, 0, -2]
#   x2 = [-1.5, -4, 1, 0.2]  -> trimmed [-1.5, -4, 0, 0]
TIES_ROWS = ([3.0, -1.0, 0.5, -2.0], [-1.5, -4.0, 1.0, 0.2])


def test_magnitude_prune_by_hand():
    got = merge_adapters(one_tensor_adapters(*TIES_ROWS), [1.0, 0.5], "magnitude_prune", density=0.5)
    # [3, 0, 0, -2] + 0.5 * [-1.5, -4, 0, 0]
    torch.testing.assert_close(got["w"], torch.tensor([2.25, -2.0, 0.0, -2.0], **F64), rtol=0, atol=1e-15)


def test_ties_by_hand():
    got = merge_adapters(one_tensor_adapters(*TIES_ROWS), [1.0, 0.5], "ties", density=0.5)
    # unweighted sum of the trimmed rows [1.5, -4, 0, -2] elects signs [+, -, +, -];
    # entry 0: only x1's 3 agrees -> 3; entry 1: only 0.5 * -4 agrees -> -2;
    # entry 2: nothing survived -> 0; entry 3: only x1's -2 agrees -> -2.
    torch.testing.assert_close(got["w"], torch.tensor([3.0, -2.0, 0.0, -2.0], **F64), rtol=0, atol=1e-15)


def test_ties_averages_the_agreeing_entries_by_hand():
    adapters = one_tensor_adapters([2.0, -1.0, 3.0, -1.0], [4.0, 3.0, -3.0, -2.0], [-1.0, 5.0, 0.0, 0.5])
    got = merge_adapters(adapters, [1.0, 1.0, 1.0], "ties", density=1.0)
    # entry 0: sum 5 > 0, agreeing 2 and 4 -> 3; entry 1: sum 7 > 0, agreeing 3 and 5 -> 4;
    # entry 2: sum 0 elects +, agreeing 3 -> 3 (the zero never counts); entry 3: sum -2.5, agreeing -1, -2 -> -1.5
    torch.testing.assert_close(got["w"], torch.tensor([3.0, 4.0, 3.0, -1.5], **F64), rtol=0, atol=1e-15)


def test_dare_drops_and_rescales_each_entry():
    x = torch.linspace(1.0, 2.0, 40_000, **F64)
    got = merge_adapters([{"w": x}], [1.0], "dare_task_arithmetic", density=0.25, generator=seeded(5))["w"]
    kept = got != 0
    # survivors are rescaled by exactly 1 / density, the rest are zero
    torch.testing.assert_close(got[kept], x[kept] / 0.25, rtol=0, atol=1e-15)
    # the kept fraction is Binomial(40000, 0.25) / 40000: std 0.0022, allow 5 std
    assert abs(kept.double().mean().item() - 0.25) < 0.011


def test_delta_space_merges_products_not_factors():
    a1, b1 = torch.tensor([[1.0, 2.0]], **F64), torch.tensor([[1.0], [0.0]], **F64)
    a2, b2 = torch.tensor([[0.0, 4.0]], **F64), torch.tensor([[0.0], [2.0]], **F64)
    adapters = [{"m.lora_A.weight": a1, "m.lora_B.weight": b1}, {"m.lora_A.weight": a2, "m.lora_B.weight": b2}]
    got = merge_adapters(adapters, [1.0, 1.0], "linear", space="delta")
    # B1 A1 = [[1, 2], [0, 0]], B2 A2 = [[0, 0], [0, 8]]; their average:
    torch.testing.assert_close(got["m"], torch.tensor([[0.5, 1.0], [0.0, 4.0]], **F64), rtol=0, atol=1e-15)
    factors = merge_adapters(adapters, [1.0, 1.0], "linear")
    # whereas averaging the factors gives B A = [[0.5], [1]] @ [[0.5, 3]] = [[0.25, 1.5], [0.5, 3]]
    torch.testing.assert_close(factors["m.lora_B.weight"] @ factors["m.lora_A.weight"],
                               torch.tensor([[0.25, 1.5], [0.5, 3.0]], **F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("rank", [2, 4, 6])
def test_delta_svd_is_the_best_rank_r_approximation_with_balanced_factors(rank):
    adapters = [random_adapter(s, torch.float64) for s in (8, 9)]
    got = merge_adapters(adapters, [0.6, 0.4], "linear", space="delta_svd", rank=rank)
    merged_delta = merge_adapters(adapters, [0.6, 0.4], "linear", space="delta")
    for module in ("base_model.model.q", "base_model.model.v"):
        a, b = got[f"{module}.lora_A.weight"], got[f"{module}.lora_B.weight"]
        assert a.shape == (rank, 16) and b.shape[1] == rank
        u, s, vh = torch.linalg.svd(merged_delta[module])  # the reference: Eckart-Young truncation
        torch.testing.assert_close(b @ a, (u[:, :rank] * s[:rank]) @ vh[:rank], rtol=1e-10, atol=1e-10)
        # B^T B = A A^T = diag(S_r)
        torch.testing.assert_close(b.T @ b, torch.diag(s[:rank]), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a @ a.T, torch.diag(s[:rank]), rtol=1e-10, atol=1e-10)
    # keys outside LoRA pairs are merged as they are
    torch.testing.assert_close(got["base_model.model.norm.weight"],
                               0.6 * adapters[0]["base_model.model.norm.weight"]
                               + 0.4 * adapters[1]["base_model.model.norm.weight"], rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Invariants.


@pytest.mark.parametrize("method", ALL_METHODS)
def test_one_adapter_with_weight_one_comes_back(method):
    adapter = random_adapter(10)
    got = merge_adapters([adapter], [1.0], method, generator=seeded(0))
    for key, value in adapter.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    delta = merge_adapters([adapter], [1.0], method, space="delta", generator=seeded(0))
    svd = merge_adapters([adapter], [1.0], method, space="delta_svd", generator=seeded(0))
    for module in ("base_model.model.q", "base_model.model.v"):
        product = adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]
        torch.testing.assert_close(delta[module], product)
        torch.testing.assert_close(svd[f"{module}.lora_B.weight"] @ svd[f"{module}.lora_A.weight"], product,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [2.0, 7.0, 1.0], [1.5, -0.5, 1.0]])
def test_linear_merge_of_identical_adapters_returns_it(weights):
    adapter = random_adapter(11, torch.float64)
    got = merge_adapters([adapter, adapter, adapter], weights, "linear")
    for key, value in adapter.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12)


def test_full_density_ties_is_the_sign_elected_mean():
    adapters = [random_adapter(s, torch.float64) for s in (12, 13, 14, 15)]
    got = merge_adapters(adapters, [1.0] * 4, "ties", density=1.0)
    for key in ADAPTER_SHAPES:
        stacked = torch.stack([a[key] for a in adapters]).reshape(4, -1)
        expected = []
        for column in stacked.T.tolist():  # entry by entry, in plain Python
            sign = 1.0 if sum(column) >= 0 else -1.0
            agreeing = [v for v in column if v * sign > 0]
            expected.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
        torch.testing.assert_close(got[key].reshape(-1), torch.tensor(expected, **F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("space", ["factors", "delta", "delta_svd"])
def test_dtype_is_preserved_and_arithmetic_is_at_least_float32(method, dtype, space):
    adapters = [random_adapter(s, dtype) for s in (16, 17, 18)]
    got = merge_adapters(adapters, [0.3, 0.3, 0.4], method, density=0.6, generator=seeded(3), space=space)
    assert all(t.dtype == dtype for t in got.values())
    # The same merge on float32 copies, rounded once at the end, is what float32 arithmetic gives.
    wide = torch.promote_types(dtype, torch.float32)
    upcast = [{k: t.to(wide) for k, t in a.items()} for a in adapters]
    reference = merge_adapters(upcast, [0.3, 0.3, 0.4], method, density=0.6, generator=seeded(3), space=space)
    for key, value in got.items():
        assert torch.equal(value, reference[key].to(dtype)), key


def test_low_precision_linear_merge_differs_from_low_precision_arithmetic():
    # Guards the test above: merging in bf16 itself would round every intermediate and differ.
    adapters = [random_adapter(s, torch.bfloat16) for s in (16, 17, 18)]
    got = merge_adapters(adapters, [0.3, 0.3, 0.4], "linear")
    in_bf16 = {k: sum(w * a[k] for w, a in zip([0.3, 0.3, 0.4], adapters)) for k in ADAPTER_SHAPES}
    assert any(not torch.equal(got[k], in_bf16[k]) for k in ADAPTER_SHAPES)


def test_outputs_carry_no_autograd_history_and_inputs_are_untouched():
    adapters = [{k: t.requires_grad_() for k, t in random_adapter(s).items()} for s in (19, 20)]
    snapshot = [{k: t.detach().clone() for k, t in a.items()} for a in adapters]
    got = merge_adapters(adapters, [0.5, 0.5], "dare_ties", density=0.5, generator=seeded(1))
    assert not any(t.requires_grad for t in got.values())
    for adapter, before in zip(adapters, snapshot):
        assert all(torch.equal(adapter[k].detach(), before[k]) for k in before)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_dare_is_reproducible_from_the_generator(method):
    adapters = [random_adapter(s) for s in (21, 22)]
    first = merge_adapters(adapters, [0.5, 0.5], method, density=0.5, generator=seeded(42))
    again = merge_adapters(adapters, [0.5, 0.5], method, density=0.5, generator=seeded(42))
    other = merge_adapters(adapters, [0.5, 0.5], method, density=0.5, generator=seeded(43))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# ---------------------------------------------------------------------------------------------
# Registry and validation.


def test_registry_lists_looks_up_and_rejects_unknown_names():
    assert merge_method_names() == sorted(ALL_METHODS)
    assert get_merge_method("ties") is merge.ties
    with pytest.raises(ValueError, match="unknown merge method 'tie'.*dare_linear.*ties"):
        get_merge_method("tie")
    with pytest.raises(ValueError, match="unknown merge method 'slerp'"):
        merge_adapters([random_adapter(0)], [1.0], "slerp")


def test_registering_a_custom_method(monkeypatch):
    monkeypatch.setattr(merge, "_MERGE_METHODS", dict(merge._MERGE_METHODS))  # restored after the test

    @register_merge_method("elementwise_max")
    def elementwise_max(task_vectors, weights, *, density, generator):
        return task_vectors.max(dim=0).values

    adapters = one_tensor_adapters([1.0, 5.0], [3.0, 2.0])
    torch.testing.assert_close(merge_adapters(adapters, [1.0, 1.0], "elementwise_max")["w"],
                               torch.tensor([3.0, 5.0], **F64))
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method("ties")(elementwise_max)


def with_key(adapter, key, value):
    return {**adapter, key: value}


KEY = "base_model.model.q.lora_A.weight"


@pytest.mark.parametrize(("change", "error", "pattern"), [
    (lambda a: {k: v for k, v in a.items() if k != KEY}, ValueError, "state_dicts\\[1\\].*missing.*q.lora_A"),
    (lambda a: with_key(a, "extra.weight", torch.zeros(2)), ValueError, "state_dicts\\[1\\].*unexpected.*extra"),
    (lambda a: with_key(a, KEY, torch.zeros(4, 15)), ValueError, "q.lora_A.*shape \\(4, 15\\).*\\(4, 16\\)"),
    (lambda a: with_key(a, KEY, a[KEY].double()), ValueError, "q.lora_A.*float64.*float32"),
    (lambda a: with_key(a, KEY, a[KEY].long()), TypeError, "q.lora_A.*floating-point"),
])
def test_mismatched_state_dicts_are_named(change, error, pattern):
    adapter = random_adapter(0)
    with pytest.raises(error, match=pattern):
        merge_adapters([adapter, change(adapter)], [0.5, 0.5])
    with pytest.raises(error, match=pattern.replace("state_dicts\\[1\\]", "base")):
        merge_adapters([adapter], [1.0], base=change(adapter))


@pytest.mark.parametrize(("kwargs", "error", "pattern"), [
    (dict(weights=[1.0]), ValueError, "weights has 1 entries but 2"),
    (dict(weights=[1.0, float("nan")]), ValueError, "weights must be finite"),
    (dict(weights=0.5), TypeError, "weights must be a list"),
    (dict(density=0.0), ValueError, "density must be in \\(0, 1\\]"),
    (dict(density=1.5), ValueError, "density must be in \\(0, 1\\]"),
    (dict(density="0.5"), TypeError, "density must be a float"),
    (dict(scaling=float("inf")), ValueError, "scaling must be finite"),
    (dict(space="products"), ValueError, "space must be one of"),
    (dict(rank=2), ValueError, "rank .* only used with space='delta_svd'"),
    (dict(rank=0, space="delta_svd"), ValueError, "rank must be a positive int"),
    (dict(rank=13, space="delta_svd"), ValueError, "rank=13 exceeds min\\(out, in\\)=12 .*base_model.model.q"),
    (dict(weights=[1.0, -1.0]), ValueError, "linear divides by the sum of the weights, which is 0"),
])
def test_bad_arguments_are_named(kwargs, error, pattern):
    call = dict(weights=[0.5, 0.5]) | kwargs
    with pytest.raises(error, match=pattern):
        merge_adapters([random_adapter(0), random_adapter(1)], **call)


def test_bad_state_dict_containers_and_lora_pairs():
    with pytest.raises(TypeError, match="non-empty list"):
        merge_adapters([], [])
    with pytest.raises(TypeError, match="non-empty list"):
        merge_adapters(random_adapter(0), [1.0])
    with pytest.raises(TypeError, match="state_dicts\\[0\\] must be a mapping"):
        merge_adapters([[1.0]], [1.0])
    lonely_a = {"m.lora_A.weight": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="pairs 'm.lora_A.weight' with 'm.lora_B.weight'"):
        merge_adapters([lonely_a], [1.0], space="delta")
    with pytest.raises(ValueError, match="needs LoRA keys"):
        merge_adapters(one_tensor_adapters([1.0]), [1.0], space="delta")
    conv = {"m.lora_A.weight": torch.zeros(2, 3, 1, 1), "m.lora_B.weight": torch.zeros(4, 2, 1, 1)}
    with pytest.raises(ValueError, match="2-D LoRA factors"):
        merge_adapters([conv], [1.0], space="delta")

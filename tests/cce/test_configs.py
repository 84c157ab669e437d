"""Kernel launch configurations: shared-memory fitting, the per-GPU cache, the tuner's choice.

On the CPU the tuner runs with a stand-in timer (the real one needs CUDA; the GPU test below runs it for
real on the device), and the fused backward is checked against float64 with tiles that do not nest in
the forward's tile map.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge import cli
from lmforge.cce import configs, linear_cross_entropy

H200, A100, L4 = 232448, 166912, 101376  # shared memory per block (opt-in), bytes


@pytest.mark.parametrize("limit, arch", [(H200, 90), (A100, 80), (L4, 89), (48 << 10, 80), (48 << 10, 90)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shipped_defaults_fit_the_devices_shared_memory(limit, arch, dtype):
    elem = 4 if dtype == torch.float32 else 2
    for kernel in ("fwd", "bwd"):
        cfg = configs.resolve(kernel, dtype, "some GPU", 2304, limit, cache={}, arch=arch)
        # Pipeline buffers: one per stage on Hopper, one fewer before (what Triton allocates: test_sass.py).
        buffers = cfg["num_stages"] if arch >= 90 else cfg["num_stages"] - 1
        used = buffers * (cfg["BLOCK_N"] + cfg["BLOCK_V"]) * cfg["BLOCK_D"] * elem
        assert used + configs.SHARED_MARGIN <= limit, (kernel, cfg)
        assert cfg["num_stages"] >= 2 and cfg["BLOCK_V"] >= 64 and cfg["BLOCK_D"] >= 16
    fwd = configs.resolve("fwd", dtype, "x", 2304, limit, cache={}, arch=arch)
    if dtype == torch.bfloat16 and limit in (H200, A100):  # the tuned forward as shipped: 192 / 144 KiB
        assert fwd == configs.DEFAULTS[("fwd", "16bit")]
    if dtype == torch.bfloat16 and limit == L4:  # two stages of the same tiles: 48 KiB
        assert fwd == dict(configs.DEFAULTS[("fwd", "16bit")], num_stages=2)


def test_tma_config_leaves_room_for_the_dz_kernels_store_staging():
    # "tma" also configures the backward's dz kernel, whose stores take BLOCK_N x BLOCK_V bytes of shared
    # memory beyond the operand buffers (tests/cce/test_sass.py measures both kernels on sm_90).
    shipped = configs.DEFAULTS[("tma", "16bit")]
    operands = configs.shared_memory_bytes("tma", shipped, 2, 90)
    staging = shipped["BLOCK_N"] * shipped["BLOCK_V"]
    assert configs.resolve("tma", torch.bfloat16, "x", 2304, H200, cache={}, arch=90) == shipped
    assert operands + staging + configs.SHARED_MARGIN <= H200
    tight = operands + configs.SHARED_MARGIN + staging // 2  # the forward alone would fit, the dz kernel not
    cfg = configs.resolve("tma", torch.bfloat16, "x", 2304, tight, cache={}, arch=90)
    assert cfg["num_stages"] < shipped["num_stages"]
    assert configs.shared_memory_bytes("tma", cfg, 2, 90) + cfg["BLOCK_N"] * cfg["BLOCK_V"] \
        + configs.SHARED_MARGIN <= tight


def test_cache_entry_wins_over_defaults_and_the_override_over_both(tmp_path):
    path = tmp_path / "cache.json"
    tuned = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=4, num_stages=5)
    key = configs.cache_key("fwd", "16bit", "GPU A", "d<=4096")
    configs.store({key: {"config": tuned, "ms": 1.0}}, path)
    configs.store({configs.cache_key("stats", "any", "GPU A", "any"): {"config": {"BLOCK_N": 2}}}, path)
    cache = configs.load_cache(path)
    assert len(cache) == 2  # the second store merged, not replaced
    assert configs.resolve("fwd", torch.bfloat16, "GPU A", 2304, L4, cache) == tuned  # measured: not refitted
    assert configs.resolve("fwd", torch.float16, "GPU A", 2304, L4, cache) == tuned  # same dtype class
    other_gpu = configs.resolve("fwd", torch.bfloat16, "GPU B", 2304, H200, cache)
    assert other_gpu == configs.DEFAULTS[("fwd", "16bit")]
    other_class = configs.resolve("fwd", torch.bfloat16, "GPU A", 8192, H200, cache)
    assert other_class == configs.DEFAULTS[("fwd", "16bit")]
    overridden = configs.resolve("fwd", torch.bfloat16, "GPU A", 2304, L4, cache, override='{"fwd": {"num_warps": 8}}')
    assert overridden == dict(tuned, num_warps=8)
    with pytest.raises(ValueError, match="LMFORGE_CCE_CONFIG"):
        configs.resolve("fwd", torch.bfloat16, "GPU A", 2304, L4, cache, override="[1, 2]")


def test_unreadable_cache_names_the_file(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cache.json"):
        configs.load_cache(path)
    path.write_text(json.dumps({"version": 1}))
    with pytest.raises(ValueError, match="entries"):
        configs.load_cache(path)


def test_tune_keeps_the_fastest_candidate_and_records_failures(tmp_path):
    path = tmp_path / "cache.json"
    times = {}
    for i, cfg in enumerate(configs.candidates("fwd")):
        times[json.dumps(cfg, sort_keys=True)] = 10.0 + abs(i - 2)  # candidate 2 is fastest (10.0)
    seen = []

    def measure(kernel):
        # tune() forces each candidate through LMFORGE_CCE_CONFIG, as a real launch would read it.
        cfg = json.loads(configs.os.environ["LMFORGE_CCE_CONFIG"])[kernel]
        seen.append(cfg)
        if kernel == "fwd" and cfg == configs.candidates("fwd")[0]:
            raise RuntimeError("out of resources: shared memory")
        if kernel == "stats":
            return 5.0 - 0.5 * len(seen)  # the last candidate is fastest
        return times[json.dumps(cfg, sort_keys=True)]

    result = configs.tune(["fwd", "stats"], d=2304, dtype=torch.bfloat16, measure=measure, gpu="GPU A",
                          path=path, progress=False)
    assert result["fwd"]["best"] == configs.candidates("fwd")[2]
    assert result["fwd"]["ms"] == 10.0
    assert "out of resources" in result["fwd"]["tried"][0]["error"]
    assert result["stats"]["best"] == configs.candidates("stats")[-1]
    assert seen[:len(configs.candidates("fwd"))] == configs.candidates("fwd")
    cache = configs.load_cache(path)
    assert cache[configs.cache_key("fwd", "16bit", "GPU A", "d<=4096")]["config"] == configs.candidates("fwd")[2]
    assert cache[configs.cache_key("stats", "any", "GPU A", "any")]["config"] == configs.candidates("stats")[-1]
    assert "LMFORGE_CCE_CONFIG" not in configs.os.environ
    with pytest.raises(RuntimeError, match="no candidate"):
        configs.tune(["bwd"], measure=lambda k: 1 / 0, gpu="GPU A", path=path, progress=False)
    with pytest.raises(ValueError, match="kernels must be"):
        configs.tune(["attention"], measure=measure, gpu="GPU A", path=path)


def test_cli_tune_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "cce-tune", "--kernels", "stats", "--cache", str(tmp_path / "c.json")])
    assert exit_info.value.code == 2
    assert "CUDA" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tiles; on CUDA the device's")
def test_fused_backward_with_tiles_that_do_not_nest_in_the_forward_map(monkeypatch):
    # A cached backward tile wider than the forward's map tile (separately tuned) is narrowed to nest in
    # it; the filtered gradients must still match float64.
    shipped = configs.config_for

    def config_for(kernel, dtype, device, d=None):
        cfg = shipped(kernel, dtype, device, d)
        if kernel == "bwd":
            cfg["BLOCK_V"] = 32  # the forward's map tiles are 16 wide under the interpreter
        return cfg

    monkeypatch.setattr(configs, "config_for", config_for)
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 24, 150
    e = (torch.randn(n, d, generator=g) * 2).requires_grad_()
    c = torch.randn(v, d, generator=g).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    loss = linear_cross_entropy(e, c, t, impl="triton", filter_eps=1e-9)
    loss.backward()
    e64, c64 = e.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    ref = F.cross_entropy(e64 @ c64.T, t)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(e.grad.double(), e64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c.grad.double(), c64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning times kernels on a GPU")
def test_tune_on_the_gpu_writes_a_config_the_loss_then_uses(tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    monkeypatch.setenv("LMFORGE_CCE_CONFIG_CACHE", str(path))
    result = configs.tune(["stats", "fwd"], n=1024, d=576, v=8192, warmup=1, repeats=3, progress=False)
    device = torch.device("cuda")
    assert configs.config_for("stats", None, device) == result["stats"]["best"]
    assert configs.config_for("fwd", torch.bfloat16, device, 576) == result["fwd"]["best"]
    g = torch.Generator(device="cuda").manual_seed(0)
    e = torch.randn(512, 576, device="cuda", generator=g).bfloat16()
    c = torch.randn(8192, 576, device="cuda", generator=g).bfloat16() / 24
    t = torch.randint(0, 8192, (512,), device="cuda", generator=g)
    ref = F.cross_entropy(e.double() @ c.double().T, t)
    for impl in ("gemm", "triton"):
        assert linear_cross_entropy(e, c, t, impl=impl).item() == pytest.approx(ref.item(), rel=1e-3)

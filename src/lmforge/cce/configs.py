"""Launch configurations of the CCE kernels: shipped defaults, a per-GPU cache of tuned ones, and the tuner.

Five Triton kernels take tile shapes: ``fwd`` and ``bwd`` of the fused path (kernels/forward.py,
kernels/backward.py: BLOCK_N x BLOCK_V logit tiles over BLOCK_D steps, warps, pipeline stages), ``tma``,
the GEMM path's forward on Hopper (kernels/tma_forward.py, the same kinds of tiles), and ``stats`` and
``grad`` of the GEMM path's slabs (kernels/slab.py: BLOCK_N rows x BLOCK_V columns per step, warps). The
fastest shapes depend on the GPU, the dtype and the hidden size. :func:`config_for` resolves one kernel's
configuration, in this order:

1. ``LMFORGE_CCE_CONFIG`` (JSON, e.g. ``{"fwd": {"num_stages": 3}}``): explicit overrides for experiments,
   applied on top of whatever follows;
2. the cache file (``LMFORGE_CCE_CONFIG_CACHE``, default ``$XDG_CACHE_HOME/lmforge/cce_configs.json``)
   of configurations :func:`tune` measured on this GPU model, for this kernel, dtype and shape class;
3. the shipped defaults (tuned on the H200, docs/cce-tuning.md), with the fused kernels' pipeline stages,
   then tiles, reduced until their shared memory fits the device (227 KiB per block on the H200, 163 KiB
   on the A100, 99 KiB on the L4, where the H200's four-stage forward, 144 KiB there, would not launch).

Nothing is tuned implicitly -- not at import, not on first use, not in CI -- only by :func:`tune`
(``lmforge bench cce-tune``), which times each candidate on the current GPU through the public loss and
writes the fastest to the cache (atomically: a temporary file, then a rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

KERNELS = ("fwd", "bwd", "tma", "stats", "grad")
FUSED = ("fwd", "bwd", "tma")
_FUSED_KEYS = ("BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages")
_SLAB_KEYS = ("BLOCK_N", "BLOCK_V", "num_warps")

# Shipped defaults on CUDA, by (kernel, dtype class): H200 sweeps (bench/cce_tune.py, bench/cce_slab_tune.py).
DEFAULTS = {
    ("fwd", "16bit"): dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=4),
    ("bwd", "16bit"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    ("fwd", "float32"): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2),
    ("bwd", "float32"): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2),
    # bench/cce_fused_slab_probe.py, Gemma 2 2B shape, loops flattened (v3.7): 13.33 ms with 3 stages, 13.40 with
    # 4, 14.50 for 128 x 128 (sorted order: 16.26, 17.27, 18.93); nested loops (v3.6): 15.5 / 15.6.
    ("tma", "16bit"): dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
    ("stats", "any"): dict(BLOCK_N=4, BLOCK_V=1024, num_warps=4),
    ("grad", "any"): dict(BLOCK_N=8, BLOCK_V=1024, num_warps=8),
}
# Under TRITON_INTERPRET (CPU): the smallest legal tiles keep numpy's work small.
INTERPRETER = {
    "fwd": dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, num_warps=4, num_stages=1),
    "bwd": dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, num_warps=4, num_stages=1),
    "tma": dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, num_warps=4, num_stages=1),
    "stats": dict(BLOCK_N=16, BLOCK_V=16),
    "grad": dict(BLOCK_N=16, BLOCK_V=16),
}
# What tune() tries (the default first): tuples in the order of _FUSED_KEYS / _SLAB_KEYS.
CANDIDATES = {
    "fwd": [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 32, 8, 5), (128, 128, 64, 8, 3),
            (128, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 256, 64, 8, 2)],
    "bwd": [(128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 3),
            (128, 128, 32, 8, 4), (64, 128, 64, 4, 3)],
    "tma": [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 256, 32, 8, 5),
            (256, 128, 64, 8, 3), (256, 128, 64, 16, 4), (64, 256, 64, 4, 4)],
    "stats": [(4, 1024, 4), (8, 512, 4), (8, 1024, 8), (4, 2048, 8), (16, 512, 8), (2, 2048, 4)],
    "grad": [(8, 1024, 8), (8, 512, 4), (4, 1024, 4), (16, 512, 8), (4, 2048, 8)],
}
# Bytes of shared memory left for what the estimate does not count (reductions, layout conversions).
SHARED_MARGIN = 16 << 10

_resolved: dict = {}  # (kernel, dtype class, GPU, shape class, override) -> config, for this process


def candidates(kernel: str) -> list[dict]:
    keys = _FUSED_KEYS if kernel in FUSED else _SLAB_KEYS
    return [dict(zip(keys, values)) for values in CANDIDATES[kernel]]


def dtype_class(kernel: str, dtype: torch.dtype | None) -> str:
    """The slab kernels read fp32 logits whatever the inputs; the fused kernels' tiles depend on the dtype."""
    if kernel not in FUSED:
        return "any"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the fused CCE kernels take float16, bfloat16 or float32, got {dtype}")
    return "float32" if dtype == torch.float32 else "16bit"


def shape_class(kernel: str, d: int | None) -> str:
    """Hidden-size bucket of the fused kernels (their tiles step over D); the slab kernels have one class."""
    if kernel not in FUSED:
        return "any"
    return "d<=1024" if d <= 1024 else "d<=4096" if d <= 4096 else "d>4096"


def cache_key(kernel: str, dtype_cls: str, gpu: str, shape_cls: str) -> str:
    return f"{gpu}|{kernel}|{dtype_cls}|{shape_cls}"


def cache_path() -> Path:
    explicit = os.environ.get("LMFORGE_CCE_CONFIG_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lmforge" / "cce_configs.json"


def load_cache(path: Path | None = None) -> dict:
    """The cache's entries ({key: {"config": ..., ...}}); {} if there is no file yet."""
    path = cache_path() if path is None else Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"CCE config cache {path} is not readable JSON ({err}); delete it or fix it") from err
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError(f"CCE config cache {path} has no 'entries' object; delete it or fix it")
    return data["entries"]


def store(entries: dict, path: Path | None = None) -> Path:
    """Merge ``entries`` into the cache file (a temporary file, then a rename: never half-written)."""
    path = cache_path() if path is None else Path(path)
    merged = load_cache(path)
    merged.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "entries": merged}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _resolved.clear()
    return path


def shared_memory_bytes(kernel: str, cfg: dict, elem_bytes: int, arch: int = 90) -> int:
    """A fused kernel's pipelined operand buffers, (BLOCK_N + BLOCK_V) x BLOCK_D elements each: as many as
    pipeline stages on Hopper (sm_90+, wgmma), one fewer before it (cp.async into registers' mma.sync).
    Equal to what Triton 3.6 allocates for the shipped kernels (tests/cce/test_sass.py compiles them)."""
    if kernel not in FUSED:
        return 0
    buffers = cfg["num_stages"] if arch >= 90 else max(1, cfg["num_stages"] - 1)
    return buffers * (cfg["BLOCK_N"] + cfg["BLOCK_V"]) * cfg["BLOCK_D"] * elem_bytes


def fit_shared_memory(kernel: str, cfg: dict, limit: int, elem_bytes: int, arch: int = 90) -> dict:
    """``cfg`` with pipeline stages (down to 2), then BLOCK_V, BLOCK_N and BLOCK_D (down to 64, 64, 16)
    reduced until :func:`shared_memory_bytes` plus SHARED_MARGIN fits ``limit`` bytes. For "tma" the
    backward's dz kernel (:mod:`lmforge.cce.kernels.tma_grad`), which shares its configuration, also stages
    its dz stores in shared memory: BLOCK_N x BLOCK_V bytes more (32 KiB at 128 x 256, Triton 3.6)."""
    cfg = dict(cfg)
    while (shared_memory_bytes(kernel, cfg, elem_bytes, arch) + SHARED_MARGIN
           + (cfg["BLOCK_N"] * cfg["BLOCK_V"] if kernel == "tma" else 0)) > limit:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_V"] > 64:
            cfg["BLOCK_V"] //= 2
        elif cfg["BLOCK_N"] > 64:
            cfg["BLOCK_N"] //= 2
        elif cfg["BLOCK_D"] > 16:
            cfg["BLOCK_D"] //= 2
        else:
            break
    return cfg


def resolve(kernel: str, dtype: torch.dtype | None, gpu: str, d: int | None, shared_limit: int,
            cache: dict, override: str | None = None, arch: int = 90) -> dict:
    """The configuration for ``kernel`` on GPU model ``gpu`` (see the module docstring for the order)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    dtype_cls, shape_cls = dtype_class(kernel, dtype), shape_class(kernel, d)
    hit = cache.get(cache_key(kernel, dtype_cls, gpu, shape_cls))
    if hit is not None:
        cfg = dict(hit["config"])
    else:
        elem = 4 if dtype_cls == "float32" else 2
        cfg = fit_shared_memory(kernel, DEFAULTS[(kernel, dtype_cls)], shared_limit, elem, arch)
    if override:
        try:
            cfg.update(json.loads(override).get(kernel, {}))
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"LMFORGE_CCE_CONFIG must be a JSON object of per-kernel objects, got {override!r}") \
                from err
    return cfg


def _gpu(device: torch.device) -> tuple[str, int, int]:
    return _gpu_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _gpu_of(index: int) -> tuple[str, int, int]:
    """(name, shared memory per block in bytes, compute capability as 10 major + minor) of GPU ``index``."""
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 227 << 10
    return props.name, shared, 10 * props.major + props.minor


def compute_capability(device: torch.device) -> int:
    """10 x major + minor of a CUDA device (cached: asked on every call of the loss)."""
    return _gpu(device)[2]


def config_for(kernel: str, dtype: torch.dtype | None, device: torch.device, d: int | None = None) -> dict:
    """Launch configuration of ``kernel`` for inputs of ``dtype`` and hidden size ``d`` on ``device``."""
    if device.type != "cuda":
        return dict(INTERPRETER[kernel])
    override = os.environ.get("LMFORGE_CCE_CONFIG")
    gpu, shared, arch = _gpu(device)
    key = (kernel, dtype_class(kernel, dtype), gpu, shape_class(kernel, d), override)
    if key not in _resolved:
        _resolved[key] = resolve(kernel, dtype, gpu, d, shared, load_cache(), override, arch)
    return dict(_resolved[key])


@contextlib.contextmanager
def _environ(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def forced(kernel: str, cfg: dict):
    """Within ``with forced(kernel, cfg)``, :func:`config_for` returns ``cfg`` for that kernel (tuning)."""
    return _environ("LMFORGE_CCE_CONFIG", json.dumps({kernel: cfg}))


def _cuda_measure(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int):
    """measure(kernel) -> ms: the public loss on random inputs, exact gradients; "fwd" / "tma" and "stats"
    time the forward of impl "triton" / "gemm", "bwd" / "grad" their forward+backward."""
    from lmforge.cce.api import linear_cross_entropy

    g = torch.Generator(device=device).manual_seed(0)
    e = torch.randn(n, d, device=device, generator=g).to(dtype).requires_grad_()
    c = (torch.randn(v, d, device=device, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=device, generator=g)

    def run(kernel):
        impl = "triton" if kernel in ("fwd", "bwd") else "gemm"
        if kernel in ("fwd", "tma", "stats"):
            # "stats" runs only where the GEMM path's forward keeps cuBLAS slabs.
            with torch.no_grad(), _environ("LMFORGE_CCE_TMA", "0" if kernel == "stats" else "auto"):
                linear_cross_entropy(e, c, t, impl=impl, filter_eps=None)
        else:
            e.grad = c.grad = None
            linear_cross_entropy(e, c, t, impl=impl, filter_eps=None).backward()

    def measure(kernel):
        for _ in range(warmup):
            run(kernel)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(kernel)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return measure


def tune(kernels=KERNELS, *, n: int = 8192, d: int = 2304, v: int = 256000, dtype: torch.dtype = torch.bfloat16,
         device: torch.device | str | None = None, warmup: int = 3, repeats: int = 10, path: Path | None = None,
         measure=None, gpu: str | None = None, progress: bool = True) -> dict:
    """Time every candidate of each kernel on this GPU (N x D x V random inputs, exact gradients) and store
    the fastest in the cache for (GPU, kernel, dtype, shape class of ``d``). Candidates that fail to compile
    or launch (e.g. too much shared memory) are recorded and skipped. ``measure(kernel) -> ms`` replaces
    the CUDA timing (tests). Returns {kernel: {"best": cfg, "ms": ..., "tried": [...]}}."""
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"kernels must be among {KERNELS}, got {unknown}")
    if measure is None:
        device = torch.device(device if device is not None else "cuda")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"tuning times the kernels on a CUDA GPU; device {device} is not one"
                             + ("" if torch.cuda.is_available() else " (no CUDA device here)"))
        measure = _cuda_measure(n, d, v, dtype, device, warmup, repeats)
        gpu = gpu or _gpu(device)[0]
    if gpu is None:
        raise ValueError("gpu (the device's name) is needed with a custom measure")
    from tqdm.auto import tqdm

    results, entries = {}, {}
    for kernel in kernels:
        tried = []
        for cfg in tqdm(candidates(kernel), desc=f"tune {kernel}", disable=not progress):
            with forced(kernel, cfg):  # a key of its own in the memo: no stale configuration
                try:
                    ms = float(measure(kernel))
                except Exception as err:  # compile or launch failures (out of resources, ...) are results too
                    tried.append(dict(config=cfg, error=f"{type(err).__name__}: {str(err)[:200]}"))
                    continue
            tried.append(dict(config=cfg, ms=ms))
        timed = [x for x in tried if "ms" in x]
        if not timed:
            raise RuntimeError(f"no candidate of kernel {kernel!r} ran on {gpu}: {tried}")
        best = min(timed, key=lambda x: x["ms"])
        results[kernel] = dict(best=best["config"], ms=best["ms"], tried=tried)
        key = cache_key(kernel, dtype_class(kernel, dtype), gpu, shape_class(kernel, d))
        entries[key] = dict(config=best["config"], ms=best["ms"], shape=[n, d, v], dtype=str(dtype),
                            date=time.strftime("%Y-%m-%d"), candidates=len(tried))
    store(entries, path)
    return results


@dataclasses.dataclass
class CCETuneConfig:
    """Options of ``lmforge bench cce-tune`` (the arguments of :func:`tune`)."""

    kernels: tuple[str, ...] = KERNELS
    shape: str = "gemma2-2b"  # a name from lmforge.cce.benchmark.GPU_SHAPES or "NxDxV"
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    device: str = "cuda"
    warmup: int = 3
    repeats: int = 10
    cache: str | None = None  # None = LMFORGE_CCE_CONFIG_CACHE or the user's cache file


def run_tune(config: CCETuneConfig, progress: bool = True) -> dict:
    from lmforge.cce.benchmark import parse_shape

    if config.dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {config.dtype!r}")
    n, d, v = parse_shape(config.shape)
    return tune(config.kernels, n=n, d=d, v=v, dtype=getattr(torch, config.dtype), device=config.device,
                warmup=config.warmup, repeats=config.repeats, path=config.cache, progress=progress)

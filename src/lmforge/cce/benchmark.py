"""Side-by-side benchmark of lmforge's loss against plain torch on the local device.

For each shape (tokens x hidden x vocab) and each implementation: forward time, forward+backward time
(median over repeats after warm-up), peak extra memory beyond the inputs for the forward and for
forward+backward, and relative error of loss, dE and dC against a float64 reference that is computed
independently (materialised float64 logits, one chunk of tokens at a time, torch autograd).

Memory: on CUDA from the caching allocator's peak; on the CPU from the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs), which counts everything the process touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.cce import gemm_impl
from lmforge.cce.api import linear_cross_entropy
from lmforge.cce.regimes import make_inputs, regime_stats
from lmforge.files import write_text_atomic

# Shapes from real models: (tokens, hidden, vocab).
GPU_SHAPES = {
    "gemma2-2b": (8192, 2304, 256000),
    "llama3-8b": (8192, 4096, 128256),
    "qwen2.5-7b": (8192, 3584, 152064),
    "smollm2-135m": (8192, 576, 49152),
}
CPU_SHAPES = {
    "smollm2-135m": (1024, 576, 49152),
    "small": (512, 256, 32000),
}


@dataclasses.dataclass
class CCEBenchConfig:
    """Options of ``lmforge bench cce``."""

    shapes: list[str] | None = None  # names from GPU_SHAPES / CPU_SHAPES, or "NxDxV"; None = device default
    regimes: tuple[str, ...] = ("random",)  # random | calibrated | real (see lmforge.cce.regimes)
    real_path: str | None = None  # file from bench/cce_real_data.py (the real regime; SmolLM2 shape only)
    dtype: str = "auto"  # "auto" = bfloat16 on CUDA, float32 on CPU
    impls: tuple[str, ...] = ("lmforge", "torch")
    device: str = "auto"
    warmup: int = 2
    repeats: int = 5
    # Timing rounds: after every impl's full measurement, rounds - 1 more passes time each impl again, the
    # order reversed every other pass, so a drift of the GPU's clocks over the call touches every impl alike;
    # fwd_ms / fwd_bwd_ms are then the medians of the rounds' medians (each round's in *_rounds).
    rounds: int = 1
    seed: int = 0
    out_dir: str | None = None  # run folder; None = runs/bench-cce/<timestamp>


def parse_shape(name: str) -> tuple[int, int, int]:
    if name in GPU_SHAPES:
        return GPU_SHAPES[name]
    if name in CPU_SHAPES:
        return CPU_SHAPES[name]
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", name)
    if not m:
        known = sorted(set(GPU_SHAPES) | set(CPU_SHAPES))
        raise ValueError(f"shape must be one of {known} or 'NxDxV', got {name!r}")
    return tuple(int(x) for x in m.groups())


def torch_loss(e, c, t):
    """The baseline: materialised logits in the input dtype, float32 softmax."""
    return F.cross_entropy((e @ c.T).float(), t)


def lmforge_loss(e, c, t):
    return linear_cross_entropy(e, c, t)


def lmforge_triton_loss(e, c, t):
    return linear_cross_entropy(e, c, t, impl="triton")


def lmforge_exact_loss(e, c, t):
    """lmforge's default backend without gradient filtering (exact gradients)."""
    return linear_cross_entropy(e, c, t, filter_eps=None)


def lmforge_fast_loss(e, c, t):
    """lmforge's default backend with the faster, less exact gradient-filter preset (filter_eps="fast")."""
    return linear_cross_entropy(e, c, t, filter_eps="fast")


def _torch_linear_cross_entropy():
    if not hasattr(F, "linear_cross_entropy"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (2.13+)")
    return lambda e, c, t: F.linear_cross_entropy(e, c, t)


def _torch_compile():
    # One compile thread: inductor compiles in this process. By default its first compile also starts a pool
    # of worker processes (one per core, each importing torch), whose start-up then runs beside the timings
    # that follow: the suspected cause of lmforge's random Gemma step timing 158 ms in the two rounds right
    # after torch.compile's first compile, against 63.8 before (H100, 2026-12-07; the step launches ~600
    # kernels from Python, so it slows with the host).
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    return torch.compile(torch_loss, dynamic=False)


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda e, c, t: liger_fused_linear_cross_entropy(e, c, t)


def _apple(impl):
    def make():
        from cut_cross_entropy import linear_cross_entropy as apple_lce

        return lambda e, c, t: apple_lce(e, c, t, impl=impl)

    return make


IMPLEMENTATIONS = {"lmforge": lmforge_loss, "lmforge_triton": lmforge_triton_loss,
                   "lmforge_exact": lmforge_exact_loss, "lmforge_fast": lmforge_fast_loss, "torch": torch_loss,
                   "lmforge_dc_workspace": lmforge_loss, "lmforge_no_dc_workspace": lmforge_loss}
# Environment variables an implementation runs under (forward and backward), restored afterwards: the default
# loss with the filtered backward's workspace in dC's buffer forced on (the default since v3.14) or off (the
# default before: two row chunks with their own workspace, ~1.08x dE + dC at Gemma 2's shape).
IMPL_ENV = {"lmforge_dc_workspace": {"LMFORGE_CCE_DC_WORKSPACE": "1"},
            "lmforge_no_dc_workspace": {"LMFORGE_CCE_DC_WORKSPACE": "0"}}
# Peers are imported only when asked for (they are optional, and only some run on the CPU).
PEERS = {"torch_lce": _torch_linear_cross_entropy, "torch_compile": _torch_compile, "liger": _liger,
         "apple_cce": _apple("cce"), "apple_cce_exact": _apple("cce_exact")}
# What ``lmforge bench cce --compare`` (and bench/cce_gpu.py) runs side by side: lmforge's backends and every
# peer on a GPU; on the CPU the ones that run there (Liger's and Apple's kernels need CUDA).
COMPARE_IMPLS = {"cuda": ("lmforge", "lmforge_exact", "lmforge_fast", "lmforge_triton", "torch", "torch_compile",
                          "liger", "apple_cce", "apple_cce_exact"),
                 "cpu": ("lmforge", "torch", "torch_compile", "torch_lce")}


@contextlib.contextmanager
def _environment(values: dict):
    """Set environment variables for the duration of the block, then restore them."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def compare_impls(device: str = "auto") -> tuple[str, ...]:
    """The implementations of a comparison run on ``device`` ("auto": CUDA when available)."""
    return COMPARE_IMPLS["cuda" if _device(device).type == "cuda" else "cpu"]


def loss_function(name: str):
    if name in IMPLEMENTATIONS:
        return IMPLEMENTATIONS[name]
    if name in PEERS:
        return PEERS[name]()
    raise ValueError(f"unknown implementation {name!r}; known: {sorted(IMPLEMENTATIONS) + sorted(PEERS)}")


def float64_reference(e, c, t, chunk=1024):
    """Mean cross-entropy and its gradients in float64, materialising one chunk of logits at a time."""
    c64 = c.detach().double().requires_grad_()
    n = e.shape[0]
    loss = torch.zeros((), dtype=torch.float64, device=e.device)
    de = torch.empty(e.shape, dtype=torch.float64, device=e.device)
    dc = torch.zeros(c.shape, dtype=torch.float64, device=c.device)
    for start in range(0, n, chunk):
        e64 = e[start:start + chunk].detach().double().requires_grad_()
        part = F.cross_entropy(e64 @ c64.T, t[start:start + chunk], reduction="sum") / n
        g_e, g_c = torch.autograd.grad(part, (e64, c64))
        loss += part.detach()
        de[start:start + chunk] = g_e
        dc += g_c
    return loss, de, dc


def _rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


def _libc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    # A fixed mmap threshold (M_MMAP_THRESHOLD = -3) makes glibc hand large blocks back to the OS on free,
    # instead of raising the threshold and recycling them inside the heap, where the resident-set peak
    # would not see them again.
    libc.mallopt(-3, 1 << 20)
    return libc


class _Memory:
    """Peak extra memory of a region, in bytes, on CUDA or (via VmHWM) on the CPU."""

    _libc = None

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu" and _Memory._libc is None:
            _Memory._libc = _libc()

    @staticmethod
    def _status(key):
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if self._libc is not None:
                self._libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = self._status("VmHWM") - self.base


def cuda_event_times(fn, repeats: int, *, busy_cycles: int = 0) -> list[float]:
    """CUDA-event milliseconds of ``repeats`` calls of ``fn``, each between two synchronisations (how the
    benchmark times). ``busy_cycles`` > 0: the GPU spins that many clock cycles before each start event, so
    the call is queued before the GPU reaches it and the time is the GPU's alone, without the host's Python
    and launch work (~2e7 cycles is ~10 ms on an H200)."""
    times = []
    for _ in range(repeats):
        if busy_cycles:
            torch.cuda._sleep(busy_cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _time_ms(fn, device, warmup, repeats, busy_cycles: int = 0):
    """Median milliseconds of ``fn`` after ``warmup`` calls: CUDA events on a GPU (``busy_cycles``: see
    :func:`cuda_event_times`), wall-clock time elsewhere."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        with torch.cuda.device(device):
            return statistics.median(cuda_event_times(fn, repeats, busy_cycles=busy_cycles))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _timings(loss_fn, e, c, t, *, warmup, repeats) -> tuple[float, float]:
    """(forward ms without autograd, forward+backward ms) of ``loss_fn`` on leaf copies of e and c."""
    device = e.device
    e = e.detach().requires_grad_()
    c = c.detach().requires_grad_()

    def forward():
        return loss_fn(e, c, t)

    def forward_backward():
        e.grad = c.grad = None
        loss_fn(e, c, t).backward()

    with torch.no_grad():
        fwd_ms = _time_ms(forward, device, warmup, repeats)
    return fwd_ms, _time_ms(forward_backward, device, warmup, repeats)


def measure(name, loss_fn, e, c, t, ref, *, warmup, repeats):
    device = e.device
    fwd_ms, fwd_bwd_ms = _timings(loss_fn, e, c, t, warmup=warmup, repeats=repeats)
    e = e.detach().requires_grad_()
    c = c.detach().requires_grad_()

    def forward():
        return loss_fn(e, c, t)

    with _Memory(device) as mem_fwd:
        loss = forward()  # autograd on: what training keeps alive after the forward counts
    del loss
    with _Memory(device) as mem_all:
        loss = forward()
        loss.backward()
    loss_ref, de_ref, dc_ref = ref
    return dict(impl=name, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                fwd_mb=mem_fwd.peak / 2 ** 20, fwd_bwd_mb=mem_all.peak / 2 ** 20,
                loss_err=_rel(loss.detach(), loss_ref), de_err=_rel(e.grad, de_ref), dc_err=_rel(c.grad, dc_ref))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _PhaseClock:
    """Wall seconds between laps (the device synchronised first, so queued GPU work counts where it ran)."""

    def __init__(self, device: torch.device):
        self.device, self.laps = device, {}
        self._sync()
        self._last = time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def run_benchmark(config: CCEBenchConfig, progress: bool = True) -> dict:
    """Run the benchmark and write results.json and results.md into the run folder."""
    from tqdm.auto import tqdm

    device = _device(config.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(config.dtype)
    if dtype is None:
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {config.dtype!r}")
    if config.rounds < 1 or config.repeats < 1:
        raise ValueError(f"rounds and repeats must be >= 1, got rounds={config.rounds}, repeats={config.repeats}")
    unknown = [i for i in config.impls if i not in IMPLEMENTATIONS and i not in PEERS]
    if unknown:
        raise ValueError(f"impls must be among {sorted(IMPLEMENTATIONS) + sorted(PEERS)}, got {unknown}")
    names = config.shapes or list((GPU_SHAPES if device.type == "cuda" else CPU_SHAPES))
    shapes = {name: parse_shape(name) for name in names}
    out_dir = Path(config.out_dir or Path("runs") / "bench-cce" / time.strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)

    rows, stats, seconds = [], {}, {}
    jobs = [(name, regime) for name in shapes for regime in config.regimes
            if regime != "real" or shapes[name][1:] == CPU_SHAPES["smollm2-135m"][1:]]
    bar = tqdm(total=len(jobs) * (len(config.impls) + 1), desc="bench cce", disable=not progress)
    for name, regime in jobs:
        n, d, v = shapes[name]
        # A fallback the GEMM path remembers is keyed by the problem's shape, not its data: without this the
        # regime measured after another of the same shape would inherit its filter history (after random
        # data, up to DENSE_SKIP_MAX steps without filtering: calibrated Gemma timed exact, 64.7 ms, H100
        # 2026-12-07). Each regime starts as a new run would.
        gemm_impl.reset_filter_history()
        # Wall seconds per phase (a GPU call's budget goes mostly to what is not measured: this says where)
        clock = _PhaseClock(device)
        e, c, t = make_inputs(regime, n, d, v, dtype=dtype, device=device, seed=config.seed,
                              real_path=config.real_path)
        clock.lap("inputs")
        bar.set_postfix_str(f"{name}/{regime}: float64 reference")
        ref = float64_reference(e, c, t)
        clock.lap("reference")
        if regime != "random":
            stats[f"{name}/{regime}"] = regime_stats(e, c, t)
            clock.lap("regime_stats")
        bar.update()
        timed = {}  # impl -> (its loss function, its result row): what the extra rounds time again
        for impl in config.impls:
            bar.set_postfix_str(f"{name}/{regime}: {impl}")
            try:
                with _environment(IMPL_ENV.get(impl, {})):
                    fn = loss_function(impl)
                    row = measure(impl, fn, e, c, t, ref, warmup=config.warmup, repeats=config.repeats)
            except Exception as err:  # a peer that fails on this shape/device is reported, not fatal
                if impl in IMPLEMENTATIONS:
                    raise
                row, fn = dict(impl=impl, error=f"{type(err).__name__}: {err}"[:300]), None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(dict(shape=name, regime=regime, n=n, d=d, v=v, **row))
            if fn is not None:
                timed[impl] = (fn, rows[-1])
            clock.lap(impl)
            bar.update()
        if config.rounds > 1 and timed:
            bar.set_postfix_str(f"{name}/{regime}: {config.rounds - 1} more timing rounds")
            _time_rounds(timed, e, c, t, config)
            clock.lap("rounds")
        del e, c, t, ref
        seconds[f"{name}/{regime}"] = clock.laps
    bar.close()
    result = dict(device=_device_name(device), dtype=str(dtype).replace("torch.", ""),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  config=dataclasses.asdict(config), regime_stats=stats, phase_seconds=seconds, rows=rows)
    write_text_atomic(out_dir / "results.json", json.dumps(result, indent=2))
    write_text_atomic(out_dir / "results.md", markdown_table(result))
    result["out_dir"] = str(out_dir)
    return result


def _time_rounds(timed: dict, e, c, t, config: CCEBenchConfig):
    """Time every impl of ``timed`` (impl -> (loss function, row)) config.rounds - 1 more times, the order
    reversed every other round; each row's fwd_ms / fwd_bwd_ms become the medians over all its rounds."""
    per_round = {impl: ([row["fwd_ms"]], [row["fwd_bwd_ms"]]) for impl, (_, row) in timed.items()}
    names = list(timed)
    for r in range(1, config.rounds):
        for impl in (names[::-1] if r % 2 else names):
            with _environment(IMPL_ENV.get(impl, {})):
                fwd, fwd_bwd = _timings(timed[impl][0], e, c, t, warmup=config.warmup, repeats=config.repeats)
            per_round[impl][0].append(fwd)
            per_round[impl][1].append(fwd_bwd)
            if e.is_cuda:
                torch.cuda.empty_cache()
    for impl, (_, row) in timed.items():
        fwds, fwd_bwds = per_round[impl]
        row.update(fwd_ms=statistics.median(fwds), fwd_bwd_ms=statistics.median(fwd_bwds),
                   fwd_ms_rounds=fwds, fwd_bwd_ms_rounds=fwd_bwds)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown_table(result: dict) -> str:
    lines = [f"Device: {result['device']}; dtype {result['dtype']}; torch {result['torch']}; {result['date']}",
             "",
             "| shape (N x D x V) | regime | impl | fwd ms | fwd+bwd ms | fwd extra MB | fwd+bwd extra MB "
             "| loss rel err | dE rel err | dC rel err |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} ({r['n']}x{r['d']}x{r['v']}) | {r['regime']} | {r['impl']} "
                         f"| failed: {r['error'][:80]} |" + " |" * 6)
            continue
        lines.append(f"| {r['shape']} ({r['n']}x{r['d']}x{r['v']}) | {r['regime']} | {r['impl']} | {r['fwd_ms']:.2f} "
                     f"| {r['fwd_bwd_ms']:.2f} | {r['fwd_mb']:.1f} | {r['fwd_bwd_mb']:.1f} "
                     f"| {r['loss_err']:.1e} | {r['de_err']:.1e} | {r['dc_err']:.1e} |")
    for key, st in result.get("regime_stats", {}).items():
        lines.append(f"\n{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in st.items()))
    return "\n".join(lines) + "\n"

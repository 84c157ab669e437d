"""Does the GEMM path's forward gain from running each slab's statistics pass beside the next slab's GEMM?

The forward is a chain of (cuBLAS GEMM into an fp32 slab, memory-bound statistics pass over it). On one
stream the statistics pass (~3.3 ms at the Gemma 2 2B shape) adds to the GEMMs' time. With two slab
buffers and two streams, slab k's statistics can run while slab k + 1's GEMM does: this probe times

* ``serial``: :func:`lmforge.cce.gemm_impl.forward_stats` as shipped (one stream, one slab);
* ``gemm_only`` / ``stats_only``: the two halves alone (the floor of any overlap is their maximum);
* ``overlap``: two streams, two slab buffers of ``--slab-mb`` each (so twice the workspace), for each
  slab size given;
* ``bwd_serial`` / ``bwd_overlap``: the same for the exact backward (the next slab's recompute beside this
  slab's gradient pass and its dE, dC products);

checks that the overlapped statistics equal the serial ones, and prints one JSON line per variant.
CUDA only; random bf16 inputs (the forward's time does not depend on the data).

    python bench/cce_overlap_probe.py --shape 8192 2304 256000 --slab-mb 128 64 32
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import triton  # noqa: E402

from lmforge.cce import gemm_impl  # noqa: E402
from lmforge.cce.benchmark import cuda_event_times  # noqa: E402
from lmforge.cce.kernels.slab import slab_grad_kernel, slab_stats_kernel  # noqa: E402
from lmforge.cce.triton_impl import _accumulate_matmul  # noqa: E402


def _stats_pass(z, targets, state, start, cfg):
    m, s, tgt = state
    slab_stats_kernel[(triton.cdiv(z.shape[0], cfg["BLOCK_N"]),)](
        z, z, targets, m, s, s, s, tgt, m, z.shape[0], z.shape[1], start, z.stride(0), 1.0,
        HAS_BIAS=False, HAS_SOFTCAP=False, NEED_SUM=False, NEED_MU=False, NEED_SLAB=False,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"])


def _fresh_state(n, device):
    f32 = dict(dtype=torch.float32, device=device)
    return torch.full((n,), float("-inf"), **f32), torch.zeros(n, **f32), torch.zeros(n, **f32)


def _double_buffers(n, cols, device, streams):
    """One fp32 slab buffer, or two with ``streams`` (which then start after the main stream's work);
    returns (buffers, main stream, per-buffer "free again" events)."""
    buffers = [torch.empty(n * cols, dtype=torch.float32, device=device) for _ in range(2 if streams else 1)]
    main = torch.cuda.current_stream()
    for s in streams or ():
        s.wait_stream(main)
    return buffers, main, [None, None]


def _join(main, streams, tensors):
    """The main stream waits for both streams; the tensors they used stay alive until then."""
    for s in streams:
        main.wait_stream(s)
    for x in tensors:
        for s in streams:
            x.record_stream(s)


def forward_parts(e, c, targets, slab_mb, *, do_gemm=True, do_stats=True, streams=None):
    """The forward's slab loop; with ``streams`` = (gemm stream, stats stream) the two run side by side
    over two slab buffers. Returns (lse, target logit)."""
    n, vocab = e.shape[0], c.shape[0]
    cols = gemm_impl.slab_columns(n, vocab, slab_mb << 20)
    cfg = gemm_impl._blocks(e.device, "stats")
    state = _fresh_state(n, e.device)
    buffers, main, done = _double_buffers(n, cols, e.device, streams)
    for index, start in enumerate(range(0, vocab, cols)):
        width = min(cols, vocab - start)
        slot = index % len(buffers)
        z = buffers[slot][: n * width].view(n, width)
        if streams:
            gemm_stream, stats_stream = streams
            with torch.cuda.stream(gemm_stream):
                if done[slot] is not None:
                    gemm_stream.wait_event(done[slot])
                if do_gemm:
                    gemm_impl._logits_into(z, e, c[start:start + width])
                ready = torch.cuda.Event()
                ready.record(gemm_stream)
            with torch.cuda.stream(stats_stream):
                stats_stream.wait_event(ready)
                if do_stats:
                    _stats_pass(z, targets, state, start, cfg)
                done[slot] = torch.cuda.Event()
                done[slot].record(stats_stream)
        else:
            if do_gemm:
                gemm_impl._logits_into(z, e, c[start:start + width])
            if do_stats:
                _stats_pass(z, targets, state, start, cfg)
    if streams:
        _join(main, streams, buffers)
    m, s, tgt = state
    return m + torch.log(s), tgt


def backward_parts(e, c, targets, lse, slab_mb, *, streams=None):
    """The exact backward's slab loop (recompute, in-place dz, dE += dz C, dC = dz^T E); with ``streams``
    = (recompute stream, gradient stream) the next slab's recompute runs beside this slab's gradient pass
    and products, over two slab buffers. Returns (dE in fp32, dC)."""
    n, d = e.shape
    vocab = c.shape[0]
    cols = gemm_impl.slab_columns(n, vocab, slab_mb << 20)
    cfg = gemm_impl._blocks(e.device, "grad")
    g = torch.full((n,), 1.0 / n, device=e.device)
    minus_g = -g
    de32 = torch.zeros((n, d), dtype=torch.float32, device=e.device)
    dc = torch.empty_like(c)
    buffers, main, done = _double_buffers(n, cols, e.device, streams)
    for index, start in enumerate(range(0, vocab, cols)):
        width = min(cols, vocab - start)
        slot = index % len(buffers)
        z = buffers[slot][: n * width].view(n, width)
        narrow = buffers[slot].view(e.dtype)
        dz = narrow[: n * width * 2].view(n, width * 2)[:, :width]
        c_slab = c[start:start + width]
        first, second = streams if streams else (main, main)
        with torch.cuda.stream(first):
            if done[slot] is not None:
                first.wait_event(done[slot])
            gemm_impl._logits_into(z, e, c_slab)
            ready = torch.cuda.Event()
            ready.record(first)
        with torch.cuda.stream(second):
            second.wait_event(ready)
            slab_grad_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
                z, dz, z, targets, lse, lse, g, minus_g, lse, lse, n, width, start, z.stride(0), dz.stride(0), 1.0,
                HAS_BIAS=False, HAS_SOFTCAP=False, HAS_G_LSE=True, HAS_G_TGT=True, HAS_G_SUM=False,
                HAS_G_MU=False, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"])
            _accumulate_matmul(de32, dz, c_slab)
            torch.mm(dz.t(), e, out=dc[start:start + width])
            done[slot] = torch.cuda.Event()
            done[slot].record(second)
    if streams:
        _join(main, streams, [*buffers, de32, dc])
    return de32, dc


def _time(fn, repeats):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = cuda_event_times(fn, repeats)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=3, default=[8192, 2304, 256000])
    ap.add_argument("--slab-mb", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out")
    args = ap.parse_args()
    n, d, v = args.shape
    g = torch.Generator(device="cuda").manual_seed(0)
    e = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    c = (torch.randn(v, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    rows = []
    ref_lse, ref_tgt = gemm_impl.forward_stats(e, c, None, t)[:2]
    shipped = _time(lambda: gemm_impl.forward_stats(e, c, None, t), args.repeats)
    rows.append(dict(variant="serial", slab_mb=128, ms=shipped))
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    for mb in args.slab_mb:
        for name, kw in (("gemm_only", dict(do_stats=False)), ("stats_only", dict(do_gemm=False)),
                         ("serial_loop", {}), ("overlap", dict(streams=streams))):
            ms = _time(lambda: forward_parts(e, c, t, mb, **kw), args.repeats)
            row = dict(variant=name, slab_mb=mb, ms=ms)
            if name in ("overlap", "serial_loop"):
                lse, tgt = forward_parts(e, c, t, mb, **kw)
                torch.cuda.synchronize()
                row["max_lse_diff"] = float((lse - ref_lse).abs().max())
                row["max_tgt_diff"] = float((tgt - ref_tgt).abs().max())
            rows.append(row)
    lse = ref_lse
    de_ref, dc_ref = backward_parts(e, c, t, lse, 128)
    for mb in args.slab_mb:
        for name, kw in (("bwd_serial", {}), ("bwd_overlap", dict(streams=streams))):
            ms = _time(lambda: backward_parts(e, c, t, lse, mb, **kw), args.repeats)
            row = dict(variant=name, slab_mb=mb, ms=ms)
            de32, dc = backward_parts(e, c, t, lse, mb, **kw)
            torch.cuda.synchronize()
            row["max_de_diff"] = float((de32 - de_ref).abs().max() / de_ref.abs().max())
            row["max_dc_diff"] = float((dc.float() - dc_ref.float()).abs().max() / dc_ref.float().abs().max())
            rows.append(row)
    for row in rows:
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(shape=args.shape, device=torch.cuda.get_device_name(),
                                                  torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()

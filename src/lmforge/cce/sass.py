"""What the CCE Triton kernels compile to on a GPU architecture, without that GPU.

Triton compiles ahead of time for any target with its bundled ptxas and cuobjdump, so the machine code of
a kernel can be inspected on a CPU-only machine. On Hopper (sm_90) the fused kernels' products should be
warpgroup MMAs (HGMMA in SASS) fed by asynchronous copies into multi-stage shared-memory buffers (LDGSTS)
or by the tensor-memory accelerator (UTMALDG); Ampere-style mma.sync (HMMA) or synchronous loads (LDG) in
the main loop would cap them well below the tensor cores' rate. :func:`compile_for` specialises a kernel as
the JIT would for given arguments (integers equal to 1 become constants, multiples of 16 and pointers get
16-divisibility hints, which decide whether loads vectorise and pipeline), and :func:`summarise` counts those
instructions and the shared memory. ``python -m lmforge.cce.sass`` prints them for the fused kernels on
Hopper (H200), Ampere (A100) and Ada (L4), with the configurations lmforge would pick on each.
"""

from __future__ import annotations

import inspect
import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmforge.cce import configs

INSTRUCTIONS = {"HGMMA": r"\bHGMMA\b", "QGMMA": r"\bQGMMA\b",  # warpgroup MMAs: 16-bit, 8-bit operands
                "HMMA": r"\bHMMA\b", "LDGSTS": r"\bLDGSTS\b", "UTMALDG": r"\bUTMALDG\b",
                "LDG": r"\bLDG\b", "STS": r"\bSTS\b",
                # register spills: stores to and loads from thread-local memory
                "STL": r"\bSTL\b", "LDL": r"\bLDL\b"}


def compile_for(kernel, args: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4, num_stages: int = 3):
    """Compile ``kernel`` (a ``triton.jit`` function) for ``sm_<arch>``.

    ``args``: every runtime argument by name as (type, value): "*bf16", "*fp32", ... for pointers (value
    ignored), "i32" / "fp32" with the value the launch would pass (it decides the specialisation).
    ``constexprs``: the compile-time arguments by name.
    """
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise ValueError(f"{kernel!r} is not a compilable triton.jit function (TRITON_INTERPRET set when it was "
                         "defined? compile in a process without it)")
    names = list(inspect.signature(kernel.fn).parameters)
    missing = [n for n in names if n not in args and n not in constexprs]
    if missing:
        raise ValueError(f"arguments of {kernel.fn.__name__} not given: {missing}")
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
            continue
        kind, value = args[name]
        if kind.startswith("*"):
            signature[name], attrs[(i,)] = kind, [["tt.divisibility", 16]]
        elif kind == "i32" and value == 1:
            signature[name], consts[(i,)] = "constexpr", 1
        else:
            signature[name] = kind
            if kind == "i32" and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def summarise(compiled) -> dict:
    """Counts of the SASS instructions in :data:`INSTRUCTIONS` and the shared memory in bytes."""
    sass = compiled.asm["sass"]
    counts = {name: len(re.findall(pattern, sass)) for name, pattern in INSTRUCTIONS.items()}
    return dict(counts, shared=compiled.metadata.shared)


def _pointers(*specs):
    return {name: (kind, None) for spec in specs for name, kind in [spec.split(":")]}


def fused_kernels(n: int = 8192, d: int = 2304, v: int = 256000, arch: int = 90, shared_limit: int = 232448,
                  perm: bool = True) -> dict:
    """(kernel, args, constexprs, num_warps, num_stages) of the fused forward and backward for bf16 inputs
    at this shape, with the shipped configurations fitted to ``shared_limit`` (configs.resolve), the sorted
    order (``perm``) and the tile map the filtered backward reads; on sm_90+ also the GEMM path's
    descriptor-fed forward ("tma"; ``perm``: gathered classifier rows, one split per slab)."""
    from lmforge.cce.kernels.backward import logit_grad_kernel
    from lmforge.cce.kernels.forward import lse_forward_kernel

    fwd = configs.resolve("fwd", torch.bfloat16, f"sm_{arch}", d, shared_limit, cache={}, arch=arch)
    bwd = configs.resolve("bwd", torch.bfloat16, f"sm_{arch}", d, shared_limit, cache={}, arch=arch)
    ints = dict(N=("i32", n), V=("i32", v), D=("i32", d), stride_en=("i32", d), stride_ed=("i32", 1),
                stride_cv=("i32", d), stride_cd=("i32", 1))
    common = dict(HAS_BIAS=False, HAS_SOFTCAP=False, HAS_PERM=perm, DOT_PRECISION="tf32", UPCAST_DOT=False, SUB=64)
    fwd_args = dict(_pointers("E:*bf16", "C:*bf16", "Bias:*bf16", "Targets:*i64", "Perm:*i32", "L_out:*fp32",
                              "W_out:*fp32", "Sum_out:*fp32", "Tgt_out:*fp32", "Map:*fp16"),
                    v_per_split=("i32", fwd["BLOCK_V"] * 31), stride_map=("i32", v // fwd["BLOCK_V"]),
                    softcap=("fp32", 1.0), **ints)
    fwd_const = dict(common, WRITE_MAP=perm, NEED_SUM=False, NEED_MU=False,
                     **{k: fwd[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")})
    slab = 4096
    bwd_args = dict(_pointers("E:*bf16", "C:*bf16", "Bias:*bf16", "Perm:*i32", "TargetPos:*i32", "Lse:*fp32",
                              "Mu:*fp32", "Map:*fp16", "G_lse:*fp32", "G_tgt:*fp32", "G_sum:*fp32", "G_mu:*fp32",
                              "DZ:*bf16"),
                    slab_start=("i32", slab), slab_cols=("i32", slab), stride_map=("i32", v // fwd["BLOCK_V"]),
                    stride_dzn=("i32", slab), softcap=("fp32", 1.0), log_eps=("fp32", -8.3), **ints)
    bwd_const = dict(common, FILTER=perm, HAS_G_LSE=True, HAS_G_TGT=True, HAS_G_SUM=False, HAS_G_MU=False,
                     MAP_V=fwd["BLOCK_V"], **{k: bwd[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")})
    kernels = {"fwd": (lse_forward_kernel, fwd_args, fwd_const, fwd["num_warps"], fwd["num_stages"], fwd),
               "bwd": (logit_grad_kernel, bwd_args, bwd_const, bwd["num_warps"], bwd["num_stages"], bwd)}
    if arch >= 90:  # the GEMM path's descriptor-fed kernels run only where there is TMA
        kernels["tma"] = _tma_forward(n, d, v, arch, shared_limit, perm, slab)
        kernels["tma_grad"] = _tma_grad(n, d, arch, shared_limit, slab)
    return kernels


def _tma_grad(n: int, d: int, arch: int, shared_limit: int, slab: int, fp8: bool = False) -> tuple:
    """The GEMM path's backward logit-gradient kernel over one slab (either order: the slab's classifier
    rows are contiguous), with the "tma" configuration it shares with the forward; with ``fp8`` the variant
    that also writes the softmax part in e4m3 (``LMFORGE_CCE_FP8_DE``)."""
    from lmforge.cce.kernels.tma_grad import logit_grad_tma_kernel

    cfg = configs.resolve("tma", torch.bfloat16, f"sm_{arch}", d, shared_limit, cache={}, arch=arch)
    args = dict(_pointers("DZ:*bf16", "Bias:*bf16", "Targets:*i64", "Lse:*fp32", "Mu:*fp32", "G_lse:*fp32",
                          "G_tgt:*fp32", "G_sum:*fp32", "G_mu:*fp32", "Q8:*fp8e4nv", "QScale:*fp32"),
                e_desc=(f"tensordesc<bf16[{cfg['BLOCK_N']}, {cfg['BLOCK_D']}]>", None),
                c_desc=(f"tensordesc<bf16[{cfg['BLOCK_V']}, {cfg['BLOCK_D']}]>", None),
                N=("i32", n), slab_cols=("i32", slab), slab_start=("i32", slab), c_row0=("i32", slab),
                v_per_split=("i32", slab // 4),
                stride_dzn=("i32", slab), stride_q8=("i32", slab), stride_qs=("i32", slab // cfg["BLOCK_V"]),
                softcap=("fp32", 1.0))
    consts = dict(D=d, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_G_LSE=True, HAS_G_TGT=True, HAS_G_SUM=False,
                  HAS_G_MU=False, UPCAST=False, FLATTEN=True, FP8=fp8,
                  **{k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")})
    return logit_grad_tma_kernel, args, consts, cfg["num_warps"], cfg["num_stages"], cfg


def _tma_forward(n: int, d: int, v: int, arch: int, shared_limit: int, gather: bool, slab: int) -> tuple:
    from lmforge.cce.kernels.tma_forward import lse_tma_kernel

    cfg = configs.resolve("tma", torch.bfloat16, f"sm_{arch}", d, shared_limit, cache={}, arch=arch)
    args = dict(_pointers("C:*bf16", "Perm:*i32", "Bias:*bf16", "Targets:*i64", "L_out:*fp32", "W_out:*fp32",
                          "Sum_out:*fp32", "Tgt_out:*fp32", "Codes:*u8"),
                e_desc=(f"tensordesc<bf16[{cfg['BLOCK_N']}, {cfg['BLOCK_D']}]>", None),
                c_desc=(f"tensordesc<bf16[{cfg['BLOCK_V']}, {cfg['BLOCK_D']}]>", None),
                N=("i32", n), V=("i32", v), cols_per_slab=("i32", slab if gather else v),
                v_per_sub=("i32", slab if gather else cfg["BLOCK_V"] * 31), slabs_per_group=("i32", 16),
                stride_cv=("i32", d), softcap=("fp32", 1.0))
    # The sorted order runs grouped (the filtered backward's compact table), the vocabulary order in splits.
    consts = dict(D=d, SUB=1 if gather else 9, GROUPED=gather, CODE_SCALE=16, HAS_BIAS=False, HAS_SOFTCAP=False,
                  GATHER=gather, NEED_SUM=False, NEED_MU=False, UPCAST=False, FLATTEN=True, BAND=16,
                  **{k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")})
    return lse_tma_kernel, args, consts, cfg["num_warps"], cfg["num_stages"], cfg


def fp8_kernels(n: int = 8192, d: int = 2304, slab: int = 4096, arch: int = 90,
                shared_limit: int = 232448) -> list[dict]:
    """The experimental e4m3 dE path's kernels (``LMFORGE_CCE_FP8_DE``) for ``sm_<arch>``, as the backward
    launches them at Gemma 2's shape: the logit-gradient kernel's FP8 variant, the classifier piece's e4m3
    transpose and the block-scaled e4m3 accumulate into dE (bf16), one row of :func:`summarise`'s counts each."""
    from lmforge.cce.gemm_impl import _fp8_blocks
    from lmforge.cce.kernels.fp8 import fp8_accumulate_kernel, fp8_transpose_kernel

    kernel, args, consts, warps, stages, cfg = _tma_grad(n, d, arch, shared_limit, slab, fp8=True)
    rows = [dict(kernel="tma_grad_fp8", **summarise(compile_for(kernel, args, consts, arch=arch, num_warps=warps,
                                                                num_stages=stages)))]
    args = dict(_pointers("C:*bf16", "Out:*fp8e4nv"), inv_scale=("fp32", 1.0), cols=("i32", slab), D=("i32", d),
                stride_c=("i32", d), stride_out=("i32", slab))
    rows.append(dict(kernel="fp8_transpose", **summarise(compile_for(
        fp8_transpose_kernel, args, dict(EMULATE=False, BLOCK_V=64, BLOCK_D=64), arch=arch, num_stages=1))))
    block_m, block_n, block_k, launch = _fp8_blocks(cfg["BLOCK_V"])
    args = dict(_pointers("Acc:*bf16", "Scale:*fp32", "KNorm2:*fp32", "Est2:*fp32"),
                a_desc=(f"tensordesc<fp8e4nv[{block_m}, {block_k}]>", None),
                b_desc=(f"tensordesc<fp8e4nv[{block_n}, {block_k}]>", None), col_scale=("fp32", 0.5),
                M=("i32", n), N=("i32", d), K=("i32", slab), stride_acc=("i32", d),
                stride_scale=("i32", slab // cfg["BLOCK_V"]))
    consts = dict(SCALE_K=cfg["BLOCK_V"], PER_BLOCK=True, ESTIMATE=True, UPCAST=False, BLOCK_M=block_m,
                  BLOCK_N=block_n, BLOCK_K=block_k)
    rows.append(dict(kernel="fp8_accumulate", **summarise(compile_for(fp8_accumulate_kernel, args, consts, arch=arch,
                                                                       **launch))))
    return rows


CONFIG_OF = {"tma_grad": "tma"}  # kernels that run with another kernel's configuration
GPUS = {"H200": (90, 232448), "A100": (80, 166912), "L4": (89, 101376)}  # (arch, shared memory per block)


def report(gpus=tuple(GPUS), **shape) -> list[dict]:
    """One row per (GPU, kernel, vocabulary order): the configuration and :func:`summarise`'s counts, with
    configs.shared_memory_bytes' estimate beside the compiled shared memory."""
    rows = []
    for gpu in gpus:
        arch, limit = GPUS[gpu]
        for perm in (True, False):
            for name, (kernel, args, consts, warps, stages, cfg) in fused_kernels(arch=arch, shared_limit=limit,
                                                                                   perm=perm, **shape).items():
                counts = summarise(compile_for(kernel, args, consts, arch=arch, num_warps=warps, num_stages=stages))
                rows.append(dict(gpu=gpu, arch=arch, kernel=name, sorted=perm, config=cfg, **counts,
                                 estimate=configs.shared_memory_bytes(CONFIG_OF.get(name, name), cfg, 2, arch),
                                 limit=limit))
    return rows


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", nargs="+", default=list(GPUS), choices=list(GPUS))
    parser.add_argument("--out", help="also write the rows as JSON")
    parser.add_argument("--fp8", action="store_true", help="the experimental e4m3 dE path's kernels on sm_90 instead")
    cli_args = parser.parse_args()
    result = fp8_kernels() if cli_args.fp8 else report(cli_args.gpus)
    for row in result:
        print(json.dumps(row))
    if cli_args.out:
        Path(cli_args.out).write_text(json.dumps(dict(triton=triton.__version__, rows=result), indent=1))

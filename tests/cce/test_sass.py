"""The fused kernels' machine code for Hopper, Ampere and Ada, compiled ahead of time on the CPU.

Issue 3 asks that the kernels use Hopper's warpgroup MMAs (HGMMA) where Triton can emit them. Triton's
bundled ptxas and cuobjdump compile and disassemble for any architecture, so CI checks what the kernels
become on the H200 (sm_90), the A100 (sm_80) and the L4 (sm_89) with the configurations lmforge would pick
on each: tensor-core products of the right generation, operand tiles arriving by asynchronous copies, and
exactly the shared memory configs.shared_memory_bytes predicts (the estimate that fits configurations to a
GPU). The compiler runs in a child process: the test suite sets TRITON_INTERPRET, which makes kernels
uncompilable in this one.
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(600)
def test_fused_kernels_compile_to_pipelined_tensor_core_code():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lmforge.cce.sass"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {(r["gpu"], r["kernel"], r["sorted"]) for r in rows} == {
        (gpu, kernel, perm) for gpu in ("H200", "A100", "L4") for kernel in ("fwd", "bwd") for perm in (True, False)
    } | {("H200", kernel, perm) for kernel in ("tma", "tma_grad") for perm in (True, False)}
    for row in rows:
        if row["arch"] >= 90:
            assert row["HGMMA"] > 0 and row["HMMA"] == 0, row
        else:
            assert row["HMMA"] > 0 and row["HGMMA"] == 0, row
        if row["kernel"] == "tma_grad":  # E and the slab's (contiguous) classifier rows by TMA
            assert row["UTMALDG"] > 0 and row["LDGSTS"] == 0, row
            # Besides the operand buffers, the epilogue's layout conversion for coalesced dz stores takes half a
            # dz tile (BLOCK_N x BLOCK_V bytes; 32 KiB at 128 x 256 in Triton 3.6), which configs' fitting of
            # "tma" reserves, and the mbarriers.
            cfg = row["config"]
            assert 0 <= row["shared"] - row["estimate"] - cfg["BLOCK_N"] * cfg["BLOCK_V"] <= 2048, row
        elif row["kernel"] == "tma":  # E by TMA; C by TMA in the vocabulary's order, else gathered by cp.async
            assert row["UTMALDG"] > 0 and (row["LDGSTS"] > 0) == row["sorted"], row
            # TMA's pipeline adds its mbarriers (8 bytes per stage) to the operand buffers and, with the loops
            # flattened, the sorted order stages its next tile's gathered row numbers: 1048 bytes in all with
            # Triton 3.6 (the GPU's), 2072 with 3.9 (CI's); SHARED_MARGIN (16 KiB) covers either.
            assert 0 <= row["shared"] - row["estimate"] <= 4096, row
        else:
            assert row["LDGSTS"] > 0, row
            assert row["shared"] == row["estimate"], row
        assert row["shared"] + 16 * 1024 <= row["limit"], row
    # The H200 runs the tuned four-stage forward as shipped; the L4 gets fewer stages to fit.
    h200 = next(r for r in rows if r["gpu"] == "H200" and r["kernel"] == "fwd")
    l4 = next(r for r in rows if r["gpu"] == "L4" and r["kernel"] == "fwd")
    assert h200["config"]["num_stages"] == 4 and l4["config"]["num_stages"] < 4


@pytest.mark.timeout(300)
def test_fp8_de_kernels_compile_for_hopper():
    # The experimental e4m3 dE path (LMFORGE_CCE_FP8_DE) on sm_90: the accumulate kernel's products are 8-bit
    # warpgroup MMAs (QGMMA) fed by TMA without spills, the transpose spills nothing, and the logit-gradient
    # kernel's FP8 variant keeps its 16-bit HGMMA products and TMA loads (it spills some registers: recorded
    # in docs/cce-tuning.md, to be timed).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lmforge.cce.sass", "--fp8"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["kernel"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    acc, transpose, grad = rows["fp8_accumulate"], rows["fp8_transpose"], rows["tma_grad_fp8"]
    assert acc["QGMMA"] > 0 and acc["HGMMA"] == 0 and acc["UTMALDG"] > 0 and acc["STL"] == 0, acc
    assert transpose["STL"] == 0, transpose
    assert grad["HGMMA"] > 0 and grad["UTMALDG"] > 0 and grad["LDGSTS"] == 0, grad

"""CCE on a GPU: lmforge beside plain torch, torch.compile, Liger-Kernel and Apple's cut-cross-entropy.

Usage (peers must be importable; on the lent device they travel as wheels):
    python bench/cce_gpu.py --out bench/results/cce_h200.json [--shapes gemma2-2b ...] [--impls ...]
Same as `lmforge bench cce --compare`. With ``LMFORGE_CCE_INPUT_CACHE=DIR`` the calibrated inputs are kept in
DIR (safetensors, keyed by shape, dtype, seed, device type and the generator's source), so later processes of
the same call (bench/cce_ab.py's runs, bench/cce_profile.py) load them instead of generating them again.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge.cce.benchmark import COMPARE_IMPLS, GPU_SHAPES, CCEBenchConfig, markdown_table, run_benchmark  # noqa: E402

ALL_IMPLS = COMPARE_IMPLS["cuda"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=list(GPU_SHAPES))
    parser.add_argument("--impls", nargs="+", default=list(ALL_IMPLS))
    parser.add_argument("--regimes", nargs="+", default=["random", "calibrated", "real"])
    parser.add_argument("--real-path", default=".benchdata/real.safetensors",
                        help="file from bench/cce_real_data.py (real regime, SmolLM2 shape)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every impl this many times, the order reversed every other round (medians)")
    parser.add_argument("--run-dir", default="runs/bench-cce-gpu")
    parser.add_argument("--out", help="also copy results.json here")
    args = parser.parse_args()
    regimes = [r for r in args.regimes if r != "real" or Path(args.real_path).is_file()]
    config = CCEBenchConfig(shapes=args.shapes, impls=tuple(args.impls), repeats=args.repeats,
                            warmup=args.warmup, rounds=args.rounds, out_dir=args.run_dir, regimes=tuple(regimes),
                            real_path=args.real_path)
    result = run_benchmark(config)
    print(markdown_table(result))
    for job, laps in result["phase_seconds"].items():  # where the call's wall time went, per shape and regime
        print(f"seconds {job}: " + ", ".join(f"{phase} {sec:.1f}" for phase, sec in laps.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""The statistics of the CCE benchmark's "calibrated" regime (issue 3) at any shape, on the CPU or a GPU.

Prints lmforge.cce.regimes.regime_stats of lmforge.cce.regimes.calibrated_inputs(N, D, V) (bf16), to compare
with the real regime's (lmforge.cce.regimes.REAL_STATS); ``params`` override keys of
lmforge.cce.regimes.CALIBRATED. The prototypes the generator grew out of ("clustered": one temperature per
row; "solved": per-row tail and entropy, with picks outside the document's pool) are in this file's version
at commit 0597ee1 (docs/cce-tuning.md, item 6).

Usage: python bench/calibrated_generator_probe.py N D V ['{"param": value, ...}' ...] [--device cuda]
(one line of statistics per parameter set; on a GPU generation takes seconds instead of minutes)
"""

import argparse
import json
import time

import torch

from lmforge.cce.regimes import calibrated_inputs, regime_stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int)
    parser.add_argument("d", type=int)
    parser.add_argument("v", type=int)
    parser.add_argument("params", nargs="*", type=json.loads, help="JSON objects of CALIBRATED overrides")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_intermixed_args(argv)
    for params in args.params or [{}]:
        started = time.time()
        e, c, t = calibrated_inputs(args.n, args.d, args.v, dtype=torch.bfloat16, device=args.device,
                                    params=params)
        generated = time.time() - started
        stats = regime_stats(e, c, t)
        print(json.dumps({"shape": [args.n, args.d, args.v], "params": params, "generation_s": round(generated, 1),
                          **{k: round(x, 5) for k, x in stats.items()}}), flush=True)
        del e, c, t


if __name__ == "__main__":
    main()

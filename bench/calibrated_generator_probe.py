"""The statistics of the CCE benchmark's "calibrated" regime (issue 3) at any shape, on the CPU.

Prints lmforge.cce.regimes.regime_stats of lmforge.cce.regimes.calibrated_inputs(N, D, V) (bf16), to compare
with the real regime's (lmforge.cce.regimes.REAL_STATS); ``params`` override keys of
lmforge.cce.regimes.CALIBRATED. The prototypes the generator grew out of ("clustered": one temperature per
row; "solved": per-row tail and entropy, with picks outside the document's pool) are in this file's version
at commit 0597ee1 (docs/cce-tuning.md, item 6).

Usage: python bench/calibrated_generator_probe.py N D V ['{"param": value, ...}']
"""

import json
import sys
import time

import torch

from lmforge.cce.regimes import calibrated_inputs, regime_stats


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    n, d, v = (int(x) for x in argv[:3])
    params = json.loads(argv[3]) if len(argv) > 3 else {}
    started = time.time()
    e, c, t = calibrated_inputs(n, d, v, dtype=torch.bfloat16, device="cpu", params=params)
    generated = time.time() - started
    stats = regime_stats(e, c, t)
    print(json.dumps({"shape": [n, d, v], "params": params, "generation_s": round(generated, 1),
                      **{k: round(x, 5) for k, x in stats.items()}}), flush=True)


if __name__ == "__main__":
    main()

"""Time the candidate tile configurations of lmforge's CCE kernels on this GPU (lmforge.cce.configs.tune).

    python bench/cce_tune.py --shape gemma2-2b --kernels fwd bwd stats grad --out tune.json

Every candidate's median time (exact gradients, random inputs, the public loss) or its failure goes to
--out as JSON. The winners go to the config cache given by --cache; without it to a throwaway file, so a
sweep never changes what lmforge runs (``lmforge bench cce-tune`` writes the user's cache).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from lmforge.cce import configs  # noqa: E402
from lmforge.cce.benchmark import parse_shape  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gemma2-2b")
    ap.add_argument("--kernels", nargs="+", default=list(configs.KERNELS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cache", help="config cache to write the winners to (default: a throwaway file)")
    ap.add_argument("--out")
    args = ap.parse_args()
    n, d, v = parse_shape(args.shape)
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp()) / "cce_configs.json"
    results = configs.tune(args.kernels, n=n, d=d, v=v, dtype=getattr(torch, args.dtype), repeats=args.repeats,
                           path=cache)
    for kernel, result in results.items():
        for row in result["tried"]:
            print(json.dumps(dict(kernel=kernel, **row)))
        print(json.dumps(dict(kernel=kernel, best=result["best"], ms=result["ms"])))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(shape=args.shape, gpu=torch.cuda.get_device_name(),
                                                  torch=torch.__version__, results=results), indent=2))


if __name__ == "__main__":
    main()

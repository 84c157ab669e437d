"""What the public API's target-range check costs: it reads one number back to the host on every call.

``linear_cross_entropy`` checks that targets lie in [0, V) or equal ignore_index and raises a ValueError
otherwise (on CUDA an asynchronous device-side assertion: :func:`lmforge.cce.api._target_check`). This probe
times the forward and the forward+backward with the check as shipped (``shipped``: the assertion queued
after the loss's kernels), read back after the kernels (``sync_after``: LMFORGE_CCE_SYNC_CHECK=1, a
ValueError), read back before them (``blocking``: the host waits for the GPU before the first launch, the
first version) and skipped (``unchecked``), alternating the four over several rounds so drift hits all
alike, and prints the medians as JSON. CUDA only.

    python bench/cce_sync_probe.py --shape 8192 576 49152 --rounds 5
"""

import argparse
import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from lmforge.cce import api  # noqa: E402
from lmforge.cce.benchmark import _time_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=3, default=[8192, 576, 49152])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    n, d, v = args.shape
    device = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    e = torch.randn(n, d, device=device, generator=g).bfloat16().requires_grad_()
    c = (torch.randn(v, d, device=device, generator=g) / d ** 0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device=device, generator=g)
    checked = api._prepare

    def forward():
        with torch.no_grad():
            api.linear_cross_entropy(e, c, t)

    def forward_backward():
        e.grad = c.grad = None
        api.linear_cross_entropy(e, c, t).backward()

    def sync_checked(*args, **kwargs):
        os.environ["LMFORGE_CCE_SYNC_CHECK"] = "1"
        try:
            return checked(*args, **kwargs)
        finally:
            os.environ.pop("LMFORGE_CCE_SYNC_CHECK")

    def blocking(*args, **kwargs):
        *prepared, check = sync_checked(*args, **kwargs)
        check()
        return (*prepared, api._no_check)

    variants = dict(shipped=checked, sync_after=sync_checked, blocking=blocking,
                    unchecked=functools.partial(checked, check_targets=False))
    times = {(name, kind): [] for name in variants for kind in ("fwd", "fwd_bwd")}
    os.environ.pop("LMFORGE_CCE_SYNC_CHECK", None)
    try:
        for _ in range(args.rounds):
            for name, prepare in variants.items():
                api._prepare = prepare
                times[(name, "fwd")].append(_time_ms(forward, device, 3, args.repeats))
                times[(name, "fwd_bwd")].append(_time_ms(forward_backward, device, 3, args.repeats))
    finally:
        api._prepare = checked
    result = dict(shape=args.shape, device=torch.cuda.get_device_name(), torch=torch.__version__,
                  **{f"{kind}_ms_{name}": sorted(ts)[len(ts) // 2] for (name, kind), ts in times.items()})
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

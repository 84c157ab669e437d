"""Plot a CCE benchmark result (bench/results/cce_h200.json) as docs/cce_h200.png.

    python bench/plot_cce.py bench/results/cce_h200.json docs/cce_h200.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(src, dst):
    result = json.loads(open(src).read())
    rows = [r for r in result["rows"] if "error" not in r]
    groups = sorted({(r["shape"], r["regime"]) for r in rows}, key=lambda g: (g[0], g[1]))
    impls = [i for i in ("lmforge", "lmforge_fast", "lmforge_exact", "torch", "torch_compile", "liger", "apple_cce",
                         "apple_cce_exact")
             if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(3, 1, figsize=(13, 11), sharex=True)
    x = np.arange(len(groups))
    width = 0.8 / len(impls)
    metrics = (("fwd_bwd_ms", "forward+backward (ms)", False), ("fwd_bwd_mb", "fwd+bwd extra memory (MB)", True),
               ("de_err", "dE relative error vs float64", True))
    for ax, (key, label, log) in zip(axes, metrics):
        for k, impl in enumerate(impls):
            vals = [next((r[key] for r in rows if (r["shape"], r["regime"]) == g and r["impl"] == impl), np.nan)
                    for g in groups]
            ax.bar(x + k * width, vals, width, label=impl)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(impls), fontsize=8)
    axes[-1].set_xticks(x + 0.4 - width / 2)
    axes[-1].set_xticklabels([f"{s}\n{r}" for s, r in groups], fontsize=8)
    fig.suptitle(f"Linear cross-entropy on {result['device']} (bf16, torch {result['torch']}, {result['date']})")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

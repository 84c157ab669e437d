"""The ``lmforge`` command. Each subcommand is a thin layer over a library function and its config."""

from __future__ import annotations

import argparse
import sys

from lmforge.config import add_config_arguments, config_from_args


def _bench_cce(args) -> int:
    import dataclasses

    from lmforge.cce.benchmark import CCEBenchConfig, compare_impls, markdown_table, run_benchmark

    config = config_from_args(CCEBenchConfig, args)
    if args.compare:  # every implementation and peer, and the data regimes, unless given as flags
        changes = {}
        if "impls" not in vars(args):
            changes["impls"] = compare_impls(config.device)
        if "regimes" not in vars(args):
            changes["regimes"] = ("random", "calibrated") + (("real",) if config.real_path else ())
        config = dataclasses.replace(config, **changes)
    result = run_benchmark(config)
    print(markdown_table(result))
    print(f"results written to {result['out_dir']}/results.json and results.md")
    return 0


def _bench_cce_tune(args) -> int:
    from lmforge.cce.configs import CCETuneConfig, cache_path, run_tune

    config = config_from_args(CCETuneConfig, args)
    results = run_tune(config)
    for kernel, result in results.items():
        failed = sum("error" in row for row in result["tried"])
        print(f"{kernel}: {result['best']} {result['ms']:.3f} ms ({len(result['tried'])} candidates, {failed} failed)")
    print(f"written to {config.cache or cache_path()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lmforge import __version__
    from lmforge.cce.benchmark import CCEBenchConfig

    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    cce = bench.add_parser("cce", help="lmforge's loss vs plain torch: time, memory, error vs float64")
    add_config_arguments(cce, CCEBenchConfig)
    cce.add_argument("--compare", action="store_true",
                     help="lmforge beside torch, torch.compile and the installed peers (Liger, Apple's cce) on "
                          "the random and calibrated regimes (and real with --real-path), as bench/cce_gpu.py")
    cce.set_defaults(func=_bench_cce)
    from lmforge.cce.configs import CCETuneConfig

    tune = bench.add_parser("cce-tune", help="time the CCE kernels' tile configurations on this GPU and cache "
                                             "the fastest (lmforge.cce.configs)")
    add_config_arguments(tune, CCETuneConfig)
    tune.set_defaults(func=_bench_cce_tune)

    from lmforge.models.sft import add_sft_cli

    add_sft_cli(commands)

    from lmforge.agent.evaluate import add_agent_cli

    add_agent_cli(commands)

    from lmforge.evolve.run import add_evolve_cli

    add_evolve_cli(commands)

    from lmforge.prefs.loop import add_mdpo_cli

    add_mdpo_cli(commands)

    from lmforge.quickstart import add_quickstart_cli

    add_quickstart_cli(commands)
    return parser


def _end_distributed() -> None:
    """Destroy the default process group that a command under ``accelerate launch`` / torchrun joined.

    Left alive, Gloo's worker threads outlive the interpreter's teardown and the process can end in SIGABRT
    ("terminate called without an active exception") after a run that succeeded (pytorch/pytorch#190489)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"lmforge: error: {err}\n")
    finally:
        _end_distributed()


if __name__ == "__main__":
    sys.exit(main())

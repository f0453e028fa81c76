"""The `attnlab` command. Each subcommand lives beside the code it runs and registers here."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnlab",
        description="Attention in transformers: inspect a real model (inspect), time attention kernels "
        "(bench kernels), score a model on long-context tasks (eval). `attnlab COMMAND --help` for each.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="efficiency and quality benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from .bench.kernels import add_parser as add_bench_kernels
    from .eval import add_parser as add_eval
    from .report.inspect import add_parser as add_inspect

    add_bench_kernels(bench_sub)
    from .bench.quality import add_parser as add_bench_quality

    add_bench_quality(bench_sub)
    from .bench.efficiency import add_parser as add_bench_efficiency

    add_bench_efficiency(bench_sub)
    add_inspect(sub)
    add_eval(sub)
    from .heads_cli import add_parser as add_heads

    add_heads(sub)
    from .kv.cli import add_parser as add_kv

    add_kv(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

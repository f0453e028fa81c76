"""The `attnlab` command. Each subcommand lives beside the code it runs and registers here."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="efficiency and quality benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    try:
        from .bench.kernels import add_parser as add_bench_kernels
        add_bench_kernels(bench_sub)
    except ImportError:
        pass
    try:
        from .report.inspect import add_parser as add_inspect
        add_inspect(sub)
    except ImportError:
        pass
    from .eval import add_parser as add_eval
    add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

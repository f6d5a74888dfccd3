"""`python -m bench`: measure the engine."""

import argparse
import sys
from pathlib import Path

from bench.core import run_core


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Measure the engine.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    core = commands.add_parser(
        "core",
        help="one product actor and its WAL, without HTTP, next to pgbench",
        description="Durable reservations/s of one product actor (batches of 1,000), pgbench's "
        "hot-row UPDATE on the same embedded PostgreSQL, recovery time after kill -9, and actor "
        "memory. Writes DIR/core.json.",
    )
    core.add_argument("--quick", action="store_true",
                      help="100,000 reservations instead of 1,000,000 (under a minute)")
    core.add_argument("--out", default="bench-results", metavar="DIR",
                      help="where core.json goes (default ./bench-results)")
    args = parser.parse_args(argv)
    run_core(args.quick, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

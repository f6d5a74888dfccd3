"""`python -m bench`: measure the engine."""

import argparse
import os
import sys
from pathlib import Path

from bench.core import CALLS_IN_FLIGHT, run_core
from bench.run import RUNNING_ENGINE_SETTINGS, Params, run_bench

DEFAULTS = {"shoppers": (20_000, 2_000), "stock": (2_000, 200), "connections": (256, 64)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Measure the engine.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND",
                                     dest="command")
    core = commands.add_parser(
        "core",
        help="one product actor and its WAL, without HTTP, next to pgbench",
        description="Durable reservations/s of one product actor (batches of 1,000), next to "
        "an actor that only group-commits the same batches' orders rows and to pgbench's "
        "hot-row UPDATE on the same embedded PostgreSQL; then "
        "recovery time after kill -9, and actor memory. Writes DIR/core.json.",
    )
    core.add_argument("--quick", action="store_true",
                      help="100,000 reservations instead of 1,000,000 (under a minute)")
    core.add_argument("--out", default="bench-results", metavar="DIR",
                      help="where core.json goes (default ./bench-results)")
    core.add_argument("--calls-in-flight", type=int, default=CALLS_IN_FLIGHT, metavar="N",
                      help="batches kept in flight: more put more reservations in each commit, "
                      "and each waits longer for it (default "
                      f"{CALLS_IN_FLIGHT}, what two front ends send one product at full load)")
    run = commands.add_parser(
        "run",
        help="the engine and the classic baseline under the same crowd, over HTTP",
        description="Start an embedded PostgreSQL, the engine (its own process, on a Ray "
        "instance of the harness) and the baseline (one transaction with SELECT ... FOR UPDATE "
        "per order), send the same crowd of shoppers to each in turn, audit both, and write "
        "DIR/results.json, DIR/throughput.png and DIR/latency.png.",
    )
    run.add_argument("--scenario", choices=("hot", "wide", "flow", "crash"), default="hot",
                     help="hot: one product; wide: many products, uneven popularity; flow: "
                     "half the orders paid through sandbox webhooks, the rest left to expire "
                     "(the baseline only takes the orders); crash: hot with kill -9 of the "
                     "product's actor mid-run (default hot)")
    run.add_argument("--shoppers", type=int, help="one order attempt each (default 20,000; "
                     "quick 2,000)")
    run.add_argument("--stock", type=int, help="units on sale in all (default 2,000; quick 200)")
    run.add_argument("--connections", type=int, help="client connections (default 256; "
                     "quick 64)")
    run.add_argument("--rate", type=float, help="requests per second on a fixed schedule "
                     "(open loop; latency counts from when each request was due); default: "
                     "closed loop, as fast as the server answers")
    run.add_argument("--url", help="target this running engine instead of starting one "
                     "(hot and wide only). Set FLASHSALE_JWT_SECRET, FLASHSALE_ADMIN_EMAIL and "
                     "FLASHSALE_ADMIN_PASSWORD to the engine's own, and run it with "
                     "FLASHSALE_RATE_LIMITS=off: the crowd comes from one address. It is audited "
                     "through its API; the baseline still runs here")
    run.add_argument("--duration", type=float, metavar="S",
                     help="send no order after S seconds on each side; the shoppers not reached "
                     "by then do not try (default: every shopper tries once)")
    run.add_argument("--quick", action="store_true", help="a smaller crowd (under a minute)")
    run.add_argument("--out", default="bench-results", metavar="DIR",
                     help="where results go (default ./bench-results)")
    args = parser.parse_args(argv)
    if args.command == "core" and args.calls_in_flight < 1:
        parser.error("--calls-in-flight must be positive")
    out = Path(args.out)
    try:  # before minutes of measuring, not after
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {out}: {error.strerror}")
    if args.command == "core":
        run_core(args.quick, out, args.calls_in_flight)
        return 0
    pick = 1 if args.quick else 0
    values = {name: DEFAULTS[name][pick] if getattr(args, name) is None else getattr(args, name)
              for name in DEFAULTS}
    if min(values.values()) < 1:
        parser.error("--shoppers, --stock and --connections must be positive")
    for name in ("rate", "duration"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name} must be positive")
    if args.url is not None:
        if not args.url.startswith(("http://", "https://")):
            parser.error(f"--url must start with http:// or https://, got {args.url!r}")
        if args.scenario not in ("hot", "wide"):
            parser.error(f"--scenario {args.scenario} needs an engine the bench starts: its "
                         "actors to kill or its hold time to shorten; --url runs hot and wide")
        missing = [name for name in RUNNING_ENGINE_SETTINGS if not os.environ.get(name)]
        if missing:
            parser.error(f"--url needs {', '.join(missing)} set to the running engine's own")
    run_bench(Params(args.scenario, values["shoppers"], values["stock"], values["connections"],
                     args.rate, args.quick, out, args.duration, args.url))
    return 0


if __name__ == "__main__":
    sys.exit(main())

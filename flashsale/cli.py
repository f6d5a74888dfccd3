"""The `flashsale` command."""

import argparse
import asyncio
import gc
import logging
import os
import sys
import time
import uuid

import asyncpg
import msgspec
import uvloop

from flashsale.config import ConfigError, Settings, load_settings
from flashsale.persistence.database import (
    DATABASE_DOWN,
    NO_QUERY_TIMEOUTS,
    connect,
    open_database,
)
from flashsale.persistence.embedded import EmbeddedPostgres
from flashsale.persistence.replay import ProductReport, logged_products, reports

PROGRESS_EVERY_S = 1.0


def _serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the engine",
        description="Run the engine. Without FLASHSALE_DATABASE_URL it starts an embedded "
        "PostgreSQL whose data lives in DATA_DIR/pg; without RAY_ADDRESS it starts its own "
        "local Ray instance. Stops cleanly on SIGINT or SIGTERM.",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--data-dir", help="embedded database and generated secrets "
                       "(default $FLASHSALE_DATA_DIR or ./.flashsale)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="front-end processes sharing the port, with rate limits counted in "
                       "the database (default 1)")
    serve.add_argument("--demo", action="store_true",
                       help="create an admin and a live demo sale if the database has no users, "
                       "and print what to try")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(host=args.host, port=args.port, data_dir=args.data_dir,
                             workers=args.workers)
    # Ray's crash handler prints a stack dump on every SIGTERM, which is a normal stop here.
    # Ray reads this when it is first imported, so the server is imported only now.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from flashsale.serve import serve

    return uvloop.run(serve(settings, args.demo))


def _replay_parser(commands: argparse._SubParsersAction) -> None:
    replay = commands.add_parser(
        "replay",
        help="rebuild product state from the write-ahead log and check it",
        description="Rebuild each product's state from its newest snapshot and the WAL after it, "
        "and print stock, available, reserved, sold and the last sequence number. Exits 1 on a "
        "corrupt WAL or (with --verify) a broken invariant, naming the product and sequence.",
    )
    replay.add_argument("--data-dir", help="the engine's data dir (embedded database)")
    replay.add_argument("--product", metavar="ID", help="only this product (a UUID)")
    replay.add_argument("--verify", action="store_true",
                        help="also check the invariants, the snapshot against a full replay, "
                        "and the orders table against the WAL")
    replay.add_argument("--json", action="store_true", help="print JSON instead of a table")
    replay.set_defaults(run=_replay)


def _print_reports(reports: list[ProductReport]) -> None:
    if not reports:
        print("no product has events in the WAL: nothing to replay", file=sys.stderr)
        return
    print(f"{'product':36}  {'stock':>8}  {'available':>9}  {'reserved':>8}  {'sold':>8}  "
          f"{'last_seq':>9}  result")
    for r in reports:
        result = "ok" if not r.problems else "BROKEN"
        print(f"{r.product_id:36}  {r.stock:>8}  {r.available:>9}  {r.reserved:>8}  {r.sold:>8}  "
              f"{r.last_seq:>9}  {result}")
    for r in reports:
        for problem in r.problems:
            print(problem, file=sys.stderr)


async def _replay_async(settings: Settings, product: str | None, verify: bool,
                        as_json: bool) -> int:
    database = await open_database(settings)
    try:
        conn = await connect(database.dsn)
        try:
            await conn.execute(NO_QUERY_TIMEOUTS)
            products = [product] if product else await logged_products(conn)
            found: list[ProductReport] = []
            said_at = time.monotonic()
            async for one in reports(conn, products, verify=verify):
                found.append(one)
                if len(products) > 1 and time.monotonic() - said_at >= PROGRESS_EVERY_S:
                    said_at = time.monotonic()
                    print(f"replayed {len(found)} of {len(products)} products", file=sys.stderr)
        except (*DATABASE_DOWN, asyncpg.PostgresError) as error:
            raise ConfigError(f"replay stopped, the database failed: {error}") from None
        finally:
            await conn.close()
    finally:
        database.close()
    for r in found:
        if r.last_seq == 0:
            r.problems.append(f"product {r.product_id}: no events in the WAL")
    if as_json:
        print(msgspec.json.encode(found).decode())
    else:
        _print_reports(found)
    return 1 if any(r.problems for r in found) else 0


def _replay(args: argparse.Namespace) -> int:
    if args.product is not None:
        try:
            args.product = str(uuid.UUID(args.product))
        except ValueError:
            raise ConfigError(
                f"--product must be a product id (a UUID), got {args.product!r}") from None
    settings = load_settings(data_dir=args.data_dir)
    if not settings.database_url and not EmbeddedPostgres(settings.data_dir).initialized:
        # Starting the embedded server would create an empty database and report nothing wrong.
        raise ConfigError(f"no database in {settings.data_dir}: nothing to replay "
                          "(check --data-dir or FLASHSALE_DATA_DIR)")
    # The states it rebuilds are millions of objects that form no cycle; Python's collector
    # walked them again and again as they were made: about a quarter of the time of a
    # 1,000,000-event `replay --verify`.
    gc.disable()
    try:
        return asyncio.run(_replay_async(settings, args.product, args.verify, args.json))
    finally:
        gc.enable()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashsale",
        description="A flash sale engine: sells a few units to a crowd without overselling.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _serve_parser(commands)
    _replay_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as error:
        print(f"flashsale: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`flashsale replay | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the exit's flush
        return 1


if __name__ == "__main__":
    sys.exit(main())

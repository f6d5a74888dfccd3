"""The `flashsale` command."""

import argparse
import asyncio
import logging
import signal
import sys

from flashsale.config import ConfigError, Settings, load_settings
from flashsale.persistence.database import open_database


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
    serve.set_defaults(run=_serve)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve_async(settings: Settings) -> None:
    stop = _stop_on_signals()
    database = await open_database(settings)
    try:
        where = f"embedded in {database.embedded.pgdata}" if database.embedded else "external"
        print(f"flashsale: PostgreSQL ready ({where}), schema migrated", flush=True)
        print("flashsale: the HTTP API is not built yet; nothing listens on "
              f"{settings.base_url}. Press Ctrl-C to stop.", flush=True)
        await stop.wait()
    finally:
        database.close()
        print("flashsale: stopped", flush=True)


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(host=args.host, port=args.port, data_dir=args.data_dir)
    asyncio.run(_serve_async(settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashsale",
        description="A flash sale engine: sells a few units to a crowd without overselling.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _serve_parser(commands)
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


if __name__ == "__main__":
    sys.exit(main())

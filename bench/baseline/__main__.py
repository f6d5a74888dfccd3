"""`python -m bench.baseline --dsn DSN --port PORT`: serve the classic design."""

import argparse
import os

import uvloop
from aiohttp import web

from bench.baseline.server import create_app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline",
                                     description="The classic design: one PostgreSQL "
                                     "transaction with SELECT … FOR UPDATE per order.")
    parser.add_argument("--dsn", required=True, help="PostgreSQL DSN of the baseline's database")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    secret = os.environ["FLASHSALE_JWT_SECRET"]
    uvloop.install()
    web.run_app(create_app(args.dsn, secret), host=args.host, port=args.port, access_log=None,
                print=lambda _: print(f"baseline: listening on http://{args.host}:{args.port}",
                                      flush=True))


if __name__ == "__main__":
    main()

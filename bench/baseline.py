"""The baseline the service is measured against: bare aiohttp that parses the body, says ``[]``.

    python -m bench.baseline --port P [--workers N]

Same routes as the service's screening endpoint, uvloop and orjson like the service,
no access log. With several workers each process binds the port with SO_REUSEPORT and
the kernel spreads connections, as with the service's workers.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys

import orjson
from aiohttp import web


async def screen(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return web.Response(
            status=400, body=b'{"error":"bad json"}', content_type="application/json"
        )
    if not isinstance(body, dict):
        return web.Response(
            status=400, body=b'{"error":"not an object"}', content_type="application/json"
        )
    return web.Response(body=b"[]", content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/", screen)
    app.router.add_post("/tg/{trunk_group}", screen)
    app.router.add_get("/healthz", healthz)
    return app


def serve(host: str, port: int, reuse_port: bool) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        make_app(), host=host, port=port, reuse_port=reuse_port, access_log=None, print=None
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.workers <= 1:
        serve(args.host, args.port, reuse_port=False)
        return 0
    workers = [
        multiprocessing.Process(target=serve, args=(args.host, args.port, True), daemon=True)
        for _ in range(args.workers)
    ]
    for worker in workers:
        worker.start()

    def stop(signum: int, frame: object) -> None:
        for worker in workers:
            worker.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())

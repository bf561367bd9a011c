"""The GET baseline: a bare WSGI app under exactly mkv's gunicorn settings.

    python -m bench.baseline --port 8000 --workers 2 --threads 16

It answers a fixed 302 (with a blob-like Location) for any path, and a fixed JSON 404
for paths under /missing/, with no framework, index or health lookup. Its settings are
taken from mkv.service.server.gunicorn_settings, minus the hooks that start mkv's writer and
health process, so worker class, workers, threads and keep-alive are the same as mkv's
and the ratio measures what mkv's request handling costs on top of gunicorn itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

from gunicorn.app.base import BaseApplication

from mkv.config import Config
from mkv.keys import blob_path
from mkv.service.server import gunicorn_settings

LOCATION = "http://127.0.0.1:3001" + blob_path("/bench/hit")
NOT_FOUND = b'{"error": "not_found", "detail": "/missing/key"}'
MKV_HOOKS = ("on_starting", "post_worker_init", "child_exit", "on_exit")


def app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The least a server can do to answer a key lookup."""
    if environ["PATH_INFO"].startswith("/missing/"):
        start_response("404 Not Found", [("Content-Type", "application/json"),
                                         ("Content-Length", str(len(NOT_FOUND)))])
        return [NOT_FOUND]
    start_response("302 Found", [("Location", LOCATION), ("Content-Length", "0")])
    return [b""]


def settings(port: int, workers: int, threads: int) -> dict[str, Any]:
    """mkv's gunicorn settings for this bind, without mkv's process hooks."""
    cfg = Config(volumes=(), bind="127.0.0.1", port=port, workers=workers, threads=threads,
                 log_level="warning")
    out = {k: v for k, v in gunicorn_settings(cfg).items() if k not in MKV_HOOKS}
    out["proc_name"] = "mkv-bench-baseline"
    return out


class BaselineApplication(BaseApplication):
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for name, value in self.options.items():
            self.cfg.set(name, value)

    def load(self) -> Callable[..., Iterable[bytes]]:
        return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args()
    BaselineApplication(settings(args.port, args.workers, args.threads)).run()


if __name__ == "__main__":
    main()

"""`python -m mkv.writer --db PATH --socket PATH`: the writer process, started and
supervised by `mkv serve`'s hooks."""

from __future__ import annotations

import argparse
import logging
import sys

import apsw

from mkv import logs
from mkv.index.cache import ChangeCount
from mkv.service.supervise import on_stop
from mkv.writer.protocol import WriterError
from mkv.writer.server import WriterServer

log = logging.getLogger("mkv.writer")

def main(argv: list[str] | None = None) -> int:
    """`python -m mkv.writer --db PATH --socket PATH`: started by `mkv serve`'s hooks."""
    parser = argparse.ArgumentParser(prog="mkv-writer")
    parser.add_argument("--db", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text", choices=logs.FORMATS)
    parser.add_argument("--parent", type=int, default=0, help="supervising master's pid")
    parser.add_argument("--changes-fd", type=int, default=-1,
                        help="the workers' shared change count (mkv.index.cache), if any")
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format, "writer")
    try:
        changes = ChangeCount(args.changes_fd) if args.changes_fd >= 0 else None
        server = WriterServer(args.db, args.socket, args.synchronous, changes)
    except (WriterError, apsw.Error, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1

    on_stop(server.stop, args.parent)
    log.info("writing %s, listening on %s", args.db, args.socket)
    server.serve()
    log.info("stopped after %d commits of %d writes", server.commits, server.committed_ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())

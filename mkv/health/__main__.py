"""`python -m mkv.health ...`: the health process, started and supervised by `mkv serve`."""

from __future__ import annotations

import argparse
import sys

from mkv import logs
from mkv.health.checker import HealthChecker
from mkv.service.supervise import on_stop


def main(argv: list[str] | None = None) -> int:
    """`python -m mkv.health ...`: started and supervised by `mkv serve`."""
    p = argparse.ArgumentParser(prog="mkv-health")
    p.add_argument("--db", required=True)
    p.add_argument("--volumes", required=True)
    p.add_argument("--writer-socket", required=True)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--fail-count", type=int, default=2)
    p.add_argument("--ok-count", type=int, default=2)
    p.add_argument("--orphan-after", type=float, default=400.0,
                   help="seconds before the intents of a write cut off by a writer restart "
                        "are due for cleanup")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="text", choices=logs.FORMATS)
    p.add_argument("--parent", type=int, default=0, help="supervising master's pid")
    args = p.parse_args(argv)
    logs.setup(args.log_level, args.log_format, "health")
    checker = HealthChecker(args.db, args.volumes.split(","), interval=args.interval,
                            timeout=args.timeout, fail_count=args.fail_count,
                            ok_count=args.ok_count, writer_socket=args.writer_socket,
                            orphan_after=args.orphan_after)

    def stop() -> None:
        checker.stopping = True

    on_stop(stop, args.parent)
    checker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mkv serve` and `mkv volume`: the operator's entry points."""

from __future__ import annotations

import argparse
import sys

from mkv import config as config_mod
from mkv.service import metricsdir

USAGE = """usage: mkv COMMAND [options]

commands:
  serve     run the service (gunicorn workers + writer), see `mkv serve --help`
  volume    run one nginx volume in the foreground, see `mkv volume --help`
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        cfg, _ = config_mod.load(rest, prog="mkv serve", description="Run the mkv service.")
        metricsdir.share_between_workers()
        # imported only now: prometheus_client must see the metrics directory first
        from mkv.service.server import serve

        return serve(cfg, rest)
    if command == "volume":
        from mkv.volumes import nginx

        parser = argparse.ArgumentParser(prog="mkv volume",
                                         description="Run one nginx volume in the foreground.")
        nginx.add_volume_arguments(parser)
        return nginx.volume_main(parser.parse_args(rest))
    if command == "backup":
        from mkv.tools import backup

        return backup.main(rest)
    print(f"mkv: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())

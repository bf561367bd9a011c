"""`mkv serve`, `mkv volume` and `mkv backup`: the operator's entry points."""

from __future__ import annotations

import argparse
import sys

from mkv import config as config_mod
from mkv.service import metricsdir

USAGE = """usage: mkv COMMAND [options]   (mkv --version: the installed version)

commands:
  serve     run the service (gunicorn workers + writer), see `mkv serve --help`
  volume    run one nginx volume in the foreground, see `mkv volume --help`
  backup    copy the index while the service runs, see `mkv backup --help`
"""

#: `mkv volume`'s options are `volume-root`, `volume-port`... in the shared file and
#: MKV_VOLUME_ROOT... in the environment: its --port and --bind are not the service's.
#: Its --redirect-secret is the service's `redirect-secret` (config.SHARED_SUBSETS).
VOLUME_KEY_PREFIX = "volume-"


def volume_parser() -> config_mod.Parser:
    """`mkv volume`'s options, from the same sources as every command's."""
    from mkv.volumes import nginx

    parser = config_mod.Parser(
        "mkv volume", "Run one nginx volume in the foreground. In the config file and the "
        "environment its options are volume-root, volume-disk, volume-port, volume-bind, "
        "volume-workdir and volume-writers (MKV_VOLUME_ROOT, ...), and the service's own "
        "redirect-secret (MKV_REDIRECT_SECRET), so one shared file configures both.",
        key_prefix=VOLUME_KEY_PREFIX, shared=config_mod.SHARED_SUBSETS["mkv volume"],
        formatter_class=argparse.HelpFormatter, add_config_file_help=False)
    nginx.add_volume_arguments(parser)
    return parser


def mark_disks(args: argparse.Namespace) -> str | None:
    """Give every disk root its identity marker before nginx serves it (mkv.identity;
    docs/design.md, "Self-healing"): an existing marker is kept as it is. Bad disk
    arguments are left for nginx.volume_main to report. A problem's text, or None."""
    from mkv import identity
    from mkv.volumes import nginx

    try:
        disks = nginx.disks_of(args)
    except nginx.VolumeConfigError:
        return None
    for disk in disks:
        try:
            disk.root.mkdir(parents=True, exist_ok=True)
            identity.ensure_marker(disk.root)
        except (OSError, identity.BadMarker) as exc:
            return f"cannot mark {disk.root} with its volume id: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"mkv {config_mod.package_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        cfg, _ = config_mod.load(rest, prog="mkv serve", description="Run the mkv service.")
        try:
            metricsdir.share_between_workers(cfg.db)
        except (metricsdir.MetricsDirBusy, OSError) as exc:
            print(f"mkv serve: {exc}", file=sys.stderr)
            return 1
        # imported only now: prometheus_client must see the metrics directory first
        from mkv.service.server import serve

        return serve(cfg, rest)
    if command == "volume":
        from mkv.volumes import nginx

        parser = volume_parser()
        args = config_mod.parse(parser, rest)
        config_mod.exit_on(parser.problems, "mkv volume")
        problem = mark_disks(args)
        if problem:
            print(f"mkv volume: error: {problem}", file=sys.stderr)
            return 2
        return nginx.volume_main(args)
    if command == "backup":
        from mkv.tools import backup

        return backup.main(rest)
    print(f"mkv: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())

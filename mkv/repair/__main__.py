"""`python -m mkv.repair ...`: the repair process, started and supervised by `mkv serve`
with the service's configuration as JSON (mkv.repair.settings)."""

from __future__ import annotations

import argparse
import sys

from mkv import logs
from mkv.repair.settings import from_settings
from mkv.service.supervise import on_stop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mkv-repair")
    p.add_argument("--settings", required=True, help="the service's configuration, as JSON")
    p.add_argument("--parent", type=int, default=0, help="supervising master's pid")
    args = p.parse_args(argv)
    cfg = from_settings(args.settings)
    logs.setup(cfg.log_level, cfg.log_format, "repair")
    from mkv.repair.process import RepairProcess

    proc = RepairProcess(cfg)
    on_stop(proc.stop, args.parent)
    proc.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

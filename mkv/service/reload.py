"""What a SIGHUP applies: the configuration read again, checked, and split into what
can change while serving and what cannot (docs/design.md, "Reload").

The master reads the config file and the environment again (and the flags `mkv serve`
was started with, which still win). A configuration that does not validate changes
nothing: each problem is logged and the old one keeps serving. Of a valid one, the
settings that name the index, the writer's socket or the listening address cannot
change under running processes; they are refused by name and keep their old values,
and everything else applies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Sequence

from mkv import config as config_mod
from mkv.config import Config, ConfigError

log = logging.getLogger("mkv.service.reload")

#: Settings a running service cannot change: a restart of `mkv serve` changes them.
FIXED = ("db", "writer_socket", "bind", "port")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The configuration to run after a reload, and the settings refused (by option name)."""

    config: Config
    refused: tuple[str, ...]
    changed: tuple[str, ...]


def plan(old: Config, new: Config) -> Plan:
    """Pure: keep FIXED settings as they are, take everything else from `new`."""
    refused = tuple(name.replace("_", "-") for name in FIXED if getattr(old, name) != getattr(new, name))
    applied = dataclasses.replace(new, **{name: getattr(old, name) for name in FIXED})
    changed = tuple(f.name.replace("_", "-") for f in dataclasses.fields(Config)
                    if getattr(old, f.name) != getattr(applied, f.name))
    return Plan(applied, refused, changed)


def read(argv: Sequence[str], old: Config) -> Plan | None:
    """Read the configuration again; None (each problem logged) if it cannot run."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            new, _ = config_mod.read(argv, prog="mkv serve")
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, the configuration is unchanged: %s", problem)
        return None
    except SystemExit:  # the parser's own refusal (an unreadable file, a bad flag value)
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        for line in lines[-3:] or ["the configuration could not be read"]:
            log.error("reload refused, the configuration is unchanged: %s", line)
        return None
    result = plan(old, new)
    for name in result.refused:
        log.error("reload: %s cannot change while serving (restart mkv serve for it); "
                  "it keeps %r", name, getattr(old, name.replace("-", "_")))
    log.info("reloaded the configuration; changed: %s", ", ".join(result.changed) or "nothing")
    return result

"""One configuration for every mkv command: file, MKV_* environment, flags.

configargparse gives the precedence operators expect (flag > environment >
config file > default). Everything is validated at start, one line per
problem, and a bad configuration exits with code 2 before anything runs.

One file serves every command (`mkv serve`, `mkv volume`, mkv-rebuild,
mkv-rebalance): each reads its own keys and ignores the keys only other
commands have, but a key no command has is a typo and refused. Switches
whose setting must be visible where the command is typed (COMMAND_LINE_ONLY)
are refused from the file and the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib.metadata
import os
import re
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import configargparse

from mkv import fleet
from mkv.auth import TokenFileError, read_tokens
from mkv.fleet import public_url as public_url  # where it was first: config.public_url
from mkv.ring import BadDomains, BadVolume, Ring, failure_domain, parse_volume

#: Longest path a unix socket may have on Linux (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107

#: The file read when neither --config nor MKV_CONFIG names one (an empty MKV_CONFIG or
#: `--config ''` reads no file at all). Read at parse time, so tests can point it elsewhere.
DEFAULT_CONFIG = "/etc/mkv/mkv.conf"

#: Prefix of every option's environment variable: `max-value-bytes` is MKV_MAX_VALUE_BYTES.
ENV_PREFIX = "MKV_"

#: Keys of the options only some commands have (the shared ones are build_parser's), and
#: the commands that have them. Every command accepts the whole shared file and ignores
#: the keys of the others; tests/test_config.py holds this table to the commands' parsers.
COMMAND_KEYS: Mapping[str, tuple[str, ...]] = {
    "concurrency": ("mkv-rebuild", "mkv-rebalance", "mkv-scrub"),
    "quiet": ("mkv-rebuild", "mkv-rebalance", "mkv backup", "mkv-scrub"),
    "force": ("mkv-rebuild", "mkv backup"),
    "step-pages": ("mkv backup",),
    "dry-run": ("mkv-rebalance",),
    "limit-rate": ("mkv-rebalance", "mkv-scrub"),
    "no-repair": ("mkv-scrub",),
    "verify": ("mkv-rebalance",),
    "volume-root": ("mkv volume",),
    "volume-port": ("mkv volume",),
    "volume-bind": ("mkv volume",),
    "volume-workdir": ("mkv volume",),
    "volume-disk": ("mkv volume",),
    "volume-writers": ("mkv volume",),
}

#: Commands that read some of the shared keys (build_parser's) under the same name, and
#: which; every other command reads all of them or none. `mkv volume` checks the
#: signatures the service makes, so one `redirect-secret` in the shared file configures both.
SHARED_SUBSETS: Mapping[str, frozenset[str]] = {
    "mkv volume": frozenset({"redirect-secret"}),
}

#: Switches taken from the command line only. --force replaces an existing index, and
#: mkv-rebalance without --dry-run moves data: a setting left in a file or an exported
#: variable would act on a command line that does not show it, so it is refused instead.
COMMAND_LINE_ONLY = frozenset({"force", "dry-run"})


class ConfigError(Exception):
    """The configuration cannot run; `problems` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated settings shared by the service and the tools."""

    volumes: tuple[str, ...]
    replicas: int = 3
    db: str = "/var/lib/mkv/index.db"
    bind: str = "127.0.0.1"
    port: int = 3000
    workers: int = 4
    threads: int = 16
    writer_socket: str = ""
    max_key_bytes: int = 1024
    max_value_bytes: int = 1 << 30
    volume_timeout: float = 10.0
    client_timeout: float = 30.0
    protect: bool = False
    fallback: str = ""
    md5: bool = True
    synchronous: str = "NORMAL"
    vnodes: int = 0
    health_interval: float = 1.0
    health_timeout: float = 1.0
    health_fail_count: int = 2
    health_ok_count: int = 2
    log_level: str = "info"
    log_format: str = "text"
    access_log: str = "-"
    max_list_limit: int = 10_000
    list_rate: float = 100.0
    list_burst: int = 200
    #: bytes per second the repair process copies (0: no limit): docs/design.md, "Self-healing"
    repair_rate: float = 20e6
    #: seconds between the background scrubs of every blob (0: none)
    scrub_interval: float = 0.0
    #: (volume, base URL clients are redirected to), from `volumes` entries "addr=URL"
    public_urls: tuple[tuple[str, str], ...] = ()
    redirect_secret: str = ""
    redirect_ttl: int = 600
    api_tokens_file: str = ""
    auth_reads: bool = False
    #: (volume, weight), from `volumes` entries "addr;weight=W" (the others weigh 1)
    weights: tuple[tuple[str, float], ...] = ()
    #: (volume, zone, host) of every volume once any entry names a weight, zone or host;
    #: empty: every host:port is a host of its own (docs/design.md, "Placement")
    domains: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.writer_socket:
            object.__setattr__(self, "writer_socket", default_writer_socket(self.db))

    def ring(self) -> Ring:
        """The placement ring of the configured volumes (the default vnodes unless set),
        their weights and domains: every process that places builds it from here."""
        return Ring(self.volumes, **({"vnodes": self.vnodes} if self.vnodes else {}),
                    weights=dict(self.weights),
                    domains={v: (zone, host) for v, zone, host in self.domains}
                    if self.domains else None)


def default_writer_socket(db: str) -> str:
    """The writer's socket sits beside the index, so any command given `db` finds it."""
    return db + ".writer.sock"


def _can_create_in(directory: Path) -> bool:
    """Try it: permission bits say nothing for root or on a read-only mount."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _volume_list(text: str) -> list[str]:
    return [part for part in (p.strip() for p in text.replace(" ", ",").split(",")) if part]


def package_version() -> str:
    """The installed package's version, for every command's --version."""
    try:
        return importlib.metadata.version("mkv")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def env_name(key: str) -> str:
    """The environment variable of a file key: `max-value-bytes` is MKV_MAX_VALUE_BYTES."""
    return ENV_PREFIX + key.replace("-", "_").upper()


class Parser(configargparse.ArgumentParser):
    """configargparse with mkv's rules for the shared file: a key is an option's first
    long flag with `key_prefix` in front (`mkv volume --port` is `volume-port`, so it
    cannot take the service's `port`), but for the `shared` flags, whose key is the flag
    itself (SHARED_SUBSETS); an option's environment variable follows its key.

    What the file and the environment got wrong is collected in `problems` rather than
    exiting at the first, so `load` reports it with everything else.
    """

    def __init__(self, prog: str, description: str, *, key_prefix: str = "",
                 shared: frozenset[str] = frozenset(), **kw: Any) -> None:
        self.key_prefix = key_prefix
        self.shared = shared
        self.problems: list[str] = []
        kw.setdefault("formatter_class", configargparse.ArgumentDefaultsHelpFormatter)
        super().__init__(prog=prog, description=description, auto_env_var_prefix=ENV_PREFIX,
                         config_file_parser_class=SharedFile(self), **kw)
        self.add_argument("-c", "--config", is_config_file=True, env_var="MKV_CONFIG",
                          help=f"config file (see etc/mkv.conf; default: {DEFAULT_CONFIG} "
                               "if it exists)")
        self.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")

    def get_possible_config_keys(self, action: argparse.Action) -> list[str]:
        if (isinstance(action, (argparse._HelpAction, argparse._VersionAction))
                or getattr(action, "is_config_file_arg", False)):
            return []
        longs = [s[2:] for s in action.option_strings if s.startswith("--")]
        if not longs:
            return []
        return [longs[0] if longs[0] in self.shared else self.key_prefix + longs[0]]

    def file_keys(self) -> dict[str, str]:
        """This command's keys, each with the flag that sets it on the command line."""
        return {key: action.option_strings[0] for action in self._actions
                for key in self.get_possible_config_keys(action)}


@functools.cache
def known_keys() -> frozenset[str]:
    """Every key some mkv command reads from the file."""
    return frozenset(build_parser("mkv", "").file_keys()) | frozenset(COMMAND_KEYS)


class SharedFile(configargparse.DefaultConfigFileParser):
    """Reads the shared file for one command: its own keys, the others' ignored, a key no
    command has (a typo) and a command-line-only switch reported to the parser."""

    def __init__(self, parser: Parser) -> None:
        super().__init__()
        self.parser = parser

    def parse(self, stream: Any) -> OrderedDict:
        own = self.parser.file_keys()
        where = getattr(stream, "name", "the config file")
        kept: OrderedDict = OrderedDict()
        for key, value in super().parse(stream).items():
            if key in own and key in COMMAND_LINE_ONLY:
                self.parser.problems.append(
                    f"{key}: only on the command line ({own[key]}), not in {where}")
            elif key in own:
                kept[key] = value
            elif key not in known_keys():
                near = difflib.get_close_matches(key, sorted(known_keys()), n=1)
                hint = f"; did you mean {near[0]}?" if near else ""
                self.parser.problems.append(
                    f"{key}: no mkv command has this option ({where}){hint}")
        return kept


def named_config(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """The config file the command line or MKV_CONFIG names ('' for none), or None when
    neither does. Found the way configargparse finds it: a parser knowing only --config."""
    finder = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    finder.add_argument("-c", "--config")
    try:
        found, _ = finder.parse_known_args(list(argv))
    except argparse.ArgumentError:
        return ""  # `--config` without a file: the real parse says so
    return found.config if found.config is not None else env.get("MKV_CONFIG")


def parse(parser: Parser, argv: Sequence[str] | None,
          env: Mapping[str, str] | None = None) -> configargparse.Namespace:
    """Parse flags, environment and file (DEFAULT_CONFIG when none is named); what the
    file and environment got wrong is left in `parser.problems`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    for key, flag in parser.file_keys().items():
        if key in COMMAND_LINE_ONLY and env_name(key) in env:
            parser.problems.append(f"{key}: only on the command line ({flag}), "
                                   f"not from {env_name(key)} in the environment")
            del env[env_name(key)]
    if named_config(argv, env) is None and os.path.isfile(DEFAULT_CONFIG):
        argv = ["--config", DEFAULT_CONFIG, *argv]
    return parser.parse_args(argv, env_vars=env)


def build_parser(prog: str, description: str) -> Parser:
    """The parser every command but `mkv volume` starts from; commands add their own options."""
    p = Parser(prog, description)
    d = Config(volumes=())
    p.add_argument("--volumes", default="", help="volumes, comma separated: host:port[/prefix]")
    p.add_argument("--replicas", type=int, default=d.replicas, help="copies of every value")
    p.add_argument("--db", default=d.db, help="SQLite index file")
    p.add_argument("--bind", default=d.bind, help="address the service listens on")
    p.add_argument("--port", type=int, default=d.port, help="port the service listens on")
    p.add_argument("--workers", type=int, default=d.workers, help="gunicorn worker processes")
    p.add_argument("--threads", type=int, default=d.threads, help="threads per worker")
    p.add_argument("--writer-socket", default="", help="writer's unix socket (default: <db>.writer.sock)")
    p.add_argument("--max-key-bytes", type=int, default=d.max_key_bytes, help="longest key, UTF-8 bytes")
    p.add_argument("--max-value-bytes", type=int, default=d.max_value_bytes, help="largest value")
    p.add_argument("--volume-timeout", type=float, default=d.volume_timeout,
                   help="seconds to wait on a volume (connect and each read)")
    p.add_argument("--client-timeout", type=float, default=d.client_timeout,
                   help="seconds a client may pause while sending a value before the PUT is dropped")
    p.add_argument("--protect", type=_bool, default=d.protect, help="DELETE needs an UNLINK first")
    p.add_argument("--fallback", default=d.fallback,
                   help="host:port to redirect GETs of missing keys to (migration)")
    p.add_argument("--md5", type=_bool, default=d.md5, help="compute and check md5 of values")
    p.add_argument("--synchronous", default=d.synchronous, help="SQLite synchronous: NORMAL or FULL")
    p.add_argument("--vnodes", type=int, default=d.vnodes, help="virtual nodes per volume (0: default)")
    p.add_argument("--health-interval", type=float, default=d.health_interval,
                   help="seconds between volume probes")
    p.add_argument("--health-timeout", type=float, default=d.health_timeout, help="probe timeout")
    p.add_argument("--health-fail-count", type=int, default=d.health_fail_count,
                   help="failed probes before a volume is down")
    p.add_argument("--health-ok-count", type=int, default=d.health_ok_count,
                   help="good probes before a volume is up again")
    p.add_argument("--log-level", default=d.log_level, help="debug, info, warning, error")
    p.add_argument("--log-format", default=d.log_format,
                   help="text or json: the format of every mkv process's log lines")
    p.add_argument("--access-log", default=d.access_log,
                   help="where the service logs one line per request: - (stderr), a file, or off")
    p.add_argument("--max-list-limit", type=int, default=d.max_list_limit,
                   help="most keys one ?list or ?unlinked page answers")
    p.add_argument("--list-rate", type=float, default=d.list_rate,
                   help="?list and ?unlinked requests per second, for the whole service (0: no limit)")
    p.add_argument("--list-burst", type=int, default=d.list_burst,
                   help="list requests allowed at once above list-rate")
    p.add_argument("--repair-rate", type=float, default=d.repair_rate,
                   help="bytes per second the background repair (and scrub) copies and reads, "
                        "0: no limit")
    p.add_argument("--scrub-interval", type=float, default=d.scrub_interval,
                   help="seconds between background scrubs of every blob (0: no background scrub)")
    p.add_argument("--redirect-secret", default=d.redirect_secret,
                   help="sign redirects with this secret (the volumes check it); empty: unsigned")
    p.add_argument("--redirect-ttl", type=int, default=d.redirect_ttl,
                   help="seconds a signed redirect stays valid")
    p.add_argument("--api-tokens-file", default=d.api_tokens_file,
                   help="file of tokens (one a line) that PUT, DELETE and UNLINK need; empty: none")
    p.add_argument("--auth-reads", type=_bool, default=d.auth_reads,
                   help="GET, HEAD and listings need a token too")
    return p


#: What a redirect secret may hold: it is written into the volumes' nginx config as is.
_SECRET = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")


def secret_problem(secret: str) -> str:
    """What is wrong with a redirect secret, or "" (empty: signing off). Shared by the
    service and `mkv volume`, so both refuse the same secrets."""
    if secret and not _SECRET.fullmatch(secret):
        return "redirect-secret: must be 16 to 256 of A-Z a-z 0-9 . _ ~ + / = -"
    return ""


def _security_problems(ns: configargparse.Namespace) -> list[str]:
    """Signed redirects and write tokens (docs/design.md, "Signed redirects", "Tokens")."""
    problems = [p for p in [secret_problem(ns.redirect_secret)] if p]
    if ns.redirect_ttl < 1:
        problems.append("redirect-ttl: must be at least 1 second")
    if ns.api_tokens_file:
        try:
            read_tokens(ns.api_tokens_file)
        except TokenFileError as exc:
            problems.append(f"api-tokens-file: {exc}")
    elif ns.auth_reads:
        problems.append("auth-reads: needs api-tokens-file (the tokens reads would need)")
    return problems


def validate(ns: configargparse.Namespace, *, need_volumes: bool = True) -> Config:
    """Turn parsed options into a Config, collecting every problem before failing."""
    problems: list[str] = []
    entries, bad = fleet.parse_entries(_volume_list(ns.volumes or ""))
    problems += [f"volumes: {p}" for p in bad]
    volumes = [e.volume for e in entries]
    public = [(e.volume, e.url) for e in entries if e.url]
    weights = [(e.volume, e.weight) for e in entries if e.weight is not None]
    placed: tuple[tuple[str, str, str], ...] = ()
    if not bad and len(set(volumes)) == len(volumes):
        try:
            placed = fleet.domains(entries)
        except BadDomains as exc:
            problems.append(f"volumes: {exc}")
    if len(set(volumes)) != len(volumes):
        problems.append("volumes: a volume is listed twice")
    if need_volumes and not volumes and not any(p.startswith("volumes") for p in problems):
        problems.append("volumes: none given (--volumes host:port,... or MKV_VOLUMES)")
    domains = {failure_domain(v) for v in volumes}
    if ns.replicas < 1:
        problems.append("replicas: must be at least 1")
    elif volumes and ns.replicas > len(domains):
        problems.append(
            f"replicas: {ns.replicas} copies need {ns.replicas} failure domains (host:port), "
            f"only {len(domains)} configured"
        )
    for name, low in (("port", 1), ("workers", 1), ("threads", 1), ("max_key_bytes", 1),
                      ("max_value_bytes", 1), ("health_fail_count", 1), ("health_ok_count", 1)):
        if getattr(ns, name) < low:
            problems.append(f"{name.replace('_', '-')}: must be at least {low}")
    if ns.port > 65535:
        problems.append("port: must be at most 65535")
    if ns.vnodes < 0:
        problems.append("vnodes: must not be negative")
    for name in ("volume_timeout", "client_timeout", "health_interval", "health_timeout"):
        if getattr(ns, name) <= 0:
            problems.append(f"{name.replace('_', '-')}: must be positive")
    synchronous = str(ns.synchronous).upper()
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        problems.append("synchronous: must be NORMAL, FULL, EXTRA or OFF")
    if ns.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        problems.append("log-level: must be debug, info, warning, error or critical")
    log_format = str(ns.log_format).lower()
    if log_format not in ("text", "json"):
        problems.append("log-format: must be text or json")
    if not ns.access_log:
        problems.append("access-log: must be -, off or a file path")
    elif ns.access_log not in ("-", "off"):
        log_dir = Path(ns.access_log).resolve().parent
        if not log_dir.is_dir():
            problems.append(f"access-log: directory {log_dir} does not exist")
    if ns.max_list_limit < 1:
        problems.append("max-list-limit: must be at least 1")
    if ns.list_rate < 0:
        problems.append("list-rate: must not be negative (0 turns the limit off)")
    if ns.list_burst < 1:
        problems.append("list-burst: must be at least 1")
    if ns.repair_rate < 0:
        problems.append("repair-rate: must not be negative (0 turns the limit off)")
    if ns.scrub_interval < 0:
        problems.append("scrub-interval: must not be negative (0 turns the scrub off)")
    db_dir = Path(ns.db).resolve().parent
    if not db_dir.is_dir():
        problems.append(f"db: directory {db_dir} does not exist")
    elif not _can_create_in(db_dir):
        problems.append(f"db: directory {db_dir} is not writable")
    socket_path = ns.writer_socket or default_writer_socket(ns.db)
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        problems.append(f"writer-socket: {socket_path} is longer than {MAX_SOCKET_PATH} bytes "
                        "(set --writer-socket to a shorter path)")
    if ns.fallback:
        try:
            parse_volume(ns.fallback)
        except BadVolume as exc:
            problems.append(f"fallback: {exc}")
    if problems:
        raise ConfigError(problems)
    problems += _security_problems(ns)
    if problems:
        raise ConfigError(problems)
    derived = {"volumes": tuple(volumes), "public_urls": tuple(public), "weights": tuple(weights),
               "domains": placed, "synchronous": synchronous,
               "log_level": ns.log_level.lower(), "log_format": log_format}
    return Config(**{f.name: derived.get(f.name, getattr(ns, f.name, None))
                     for f in dataclasses.fields(Config)})


def read(
    argv: Sequence[str] | None,
    prog: str = "mkv",
    description: str = "mkv",
    *,
    extend: Callable[[configargparse.ArgumentParser], None] | None = None,
    need_volumes: bool = True,
) -> tuple[Config, configargparse.Namespace]:
    """Parse and validate, raising ConfigError with every problem (a reload must not exit)."""
    parser = build_parser(prog, description)
    if extend is not None:
        extend(parser)
    ns = parse(parser, argv)
    problems = list(parser.problems)
    try:
        cfg = validate(ns, need_volumes=need_volumes)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return cfg, ns


def load(argv: Sequence[str] | None, prog: str = "mkv", description: str = "mkv",
         **kw: Any) -> tuple[Config, configargparse.Namespace]:
    """`read` (same arguments); on a bad configuration print each problem and exit 2."""
    try:
        return read(argv, prog, description, **kw)
    except ConfigError as exc:
        exit_on(exc.problems, prog)
        raise  # not reached: exit_on exits on any problem


def exit_on(problems: Sequence[str], prog: str) -> None:
    """Print each problem on its own line and exit 2, if there is any."""
    for problem in problems:
        print(f"{prog}: config: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(2)

"""Run one mkv volume: stock nginx configured from deploy/nginx/.

A volume is nothing but nginx serving a directory (docs/design.md, "Volumes and the
on-disk format"), so this module only renders the templates and hands the process over to
nginx. One nginx serves one disk (`--root DIR`, the volume `host:port`) or several
(`--disk NAME=DIR`, the volumes `host:port/NAME`); who may write, list and read is the
server's (`--writers`, `redirect-secret`). Deciding what to write (the disks, the writers,
the descriptor limits, the text) is pure and testable without nginx; `render_volume` writes
the files and `run_volume` execs nginx in the foreground, so a supervisor's SIGTERM/SIGINT
reach nginx itself, with no Python in between.

Templates are looked up in `$MKV_NGINX_TEMPLATES`, then in the checkout (deploy/nginx), then
where an installed wheel puts them (<prefix>/share/mkv/nginx).
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import ipaddress
import os
import pwd
import re
import resource
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template
from typing import NoReturn

from mkv.config import secret_problem

MAIN_TEMPLATE = "nginx.conf.template"
SERVER_TEMPLATE = "volume.conf.template"
DISK_TEMPLATE = "disk.conf.template"
TEMPLATES = (MAIN_TEMPLATE, SERVER_TEMPLATE, DISK_TEMPLATE)
TEMPLATES_ENV = "MKV_NGINX_TEMPLATES"
#: deploy/nginx of the checkout this module runs from
CHECKOUT_TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
#: where an installed wheel puts them (setup.cfg, data_files): <prefix>/share/mkv/nginx
INSTALLED_TEMPLATES = Path(sys.prefix) / "share" / "mkv" / "nginx"

# The placeholders of the server and disk templates. The docker image renders the same files
# with envsubst, so these are the only ones they may use (see volume.conf.template's header).
SERVER_PLACEHOLDERS = frozenset({
    "MKV_VOLUME_LISTEN", "MKV_VOLUME_NAME", "MKV_VOLUME_ACCESS_LOG", "MKV_VOLUME_WRITERS_GEO",
    "MKV_REDIRECT_SECRET", "MKV_VOLUME_DISKS"})
DISK_PLACEHOLDERS = frozenset({"MKV_VOLUME_PREFIX", "MKV_VOLUME_ROOT"})
_PLACEHOLDER = re.compile(r"\$\{(MKV_\w+)\}")

# Where nginx spools request bodies before renaming them into place; on each disk's filesystem.
SPOOL_DIRNAME = ".tmp"
# Default per-volume runtime directory. Dot-named: mkv only reads two-hex-char directories,
# autoindex hides it and the server block refuses dot paths.
WORKDIR_NAME = ".nginx"
# The volume's access log, in its work directory: one line per request, with mkv's request id.
ACCESS_LOG_NAME = "access.log"
# The rendered files in the work directory. They hold the redirect secret, so only their owner
# (nginx's master) may read them.
MAIN_CONF, SERVER_CONF, DISKS_CONF = "nginx.conf", "volume.conf", "disks.conf"
CONF_MODE = 0o600

#: Who may PUT, DELETE and list when --writers is not given: this host only, i.e. mkv running
#: beside its volumes. mkv on other hosts must be listed.
DEFAULT_WRITERS = "127.0.0.0/8,::1"

# Per worker: a connection may hold two descriptors (its socket and the blob's file or upload
# spool). Below MIN_CONNECTIONS a volume is unusable whatever the limit says; above
# MAX_CONNECTIONS nginx only preallocates memory (some 400 bytes a connection, per worker)
# for clients one volume's disks could not serve anyway.
MIN_CONNECTIONS = 256
MAX_CONNECTIONS = 16384
FDS_PER_CONNECTION = 2

# Characters that would end or reinterpret a quoted nginx string ($ starts a variable in
# `alias`), so a path holding them cannot be written into the config safely.
_UNSAFE_PATH_CHARS = frozenset('"\\$;{}\n\r\t')
# A disk's name is its volume's one-segment prefix (mkv.ring.parse_volume's rule). It may not
# start with "." (dot paths are refused) nor be "-" (the server's /-/ping).
_DISK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NginxNotFound(RuntimeError):
    """No nginx binary: volumes cannot run on this machine until it is installed."""


class TemplateNotFound(FileNotFoundError):
    """The deploy/nginx templates are not where this installation expected them."""


class VolumeConfigError(ValueError):
    """A disk, listen address, port, writer or secret nginx could not be configured with."""


@dataclasses.dataclass(frozen=True)
class Disk:
    """One data directory and the URI prefix it is served under: "" for the one disk of a
    volume mkv addresses as host:port, "/NAME" for a volume host:port/NAME."""

    prefix: str
    root: Path


# --- pure decisions ---------------------------------------------------------------------------


def find_nginx() -> str:
    """Locate nginx; Debian installs it in /usr/sbin, which is often not on a user's PATH."""
    found = shutil.which("nginx")
    if found:
        return found
    fallback = Path("/usr/sbin/nginx")
    if fallback.is_file() and os.access(fallback, os.X_OK):
        return str(fallback)
    raise NginxNotFound(
        "nginx not found on PATH or at /usr/sbin/nginx; "
        "install it with `apt-get install nginx-light` (it includes the WebDAV module)"
    )


def templates_dir() -> Path:
    """Find the template directory, so the same code works from a checkout and installed."""
    candidates: list[Path] = []
    if os.environ.get(TEMPLATES_ENV):
        candidates.append(Path(os.environ[TEMPLATES_ENV]))
    candidates += [CHECKOUT_TEMPLATES, INSTALLED_TEMPLATES]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in TEMPLATES):
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise TemplateNotFound(
        f"nginx templates ({', '.join(TEMPLATES)}) not found in: {searched}; "
        f"set {TEMPLATES_ENV} to the deploy/nginx directory of an mkv checkout"
    )


def listen_address(bind: str, port: int) -> str:
    """Format nginx's `listen` argument; IPv6 literals need brackets there."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise VolumeConfigError(f"port must be between 1 and 65535, got {port}")
    if not bind:
        raise VolumeConfigError("bind address must not be empty")
    if ":" in bind and not bind.startswith("["):
        bind = f"[{bind}]"
    return f"{bind}:{port}"


def volume_name(listen: str) -> str:
    """The name of a volume's nginx variables, from its listen address: geo and map are
    http-wide, and each volume one nginx serves listens on its own address."""
    return re.sub(r"[^A-Za-z0-9]", "_", listen)


def parse_writers(text: str) -> tuple[Network, ...]:
    """`--writers`: addresses or CIDR networks, comma separated. A network with host bits set
    (10.0.0.5/8) is refused, as the typo it usually is; so is an empty list, which would
    lock mkv itself out."""
    networks: list[Network] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            network = ipaddress.ip_network(part)
        except ValueError as exc:
            raise VolumeConfigError(f"writers: {exc}") from None
        if network not in networks:
            networks.append(network)
    if not networks:
        raise VolumeConfigError("writers: none given; mkv itself must be one (default: "
                                f"{DEFAULT_WRITERS})")
    return tuple(networks)


def geo_entries(writers: Sequence[Network]) -> str:
    """The writers as the entries of the server template's geo block."""
    return "\n    ".join(f"{network.with_prefixlen} 1;" for network in writers)


def parse_disk(text: str) -> Disk:
    """`--disk NAME=DIR`: a disk served under /NAME, its volume host:port/NAME."""
    name, sep, root = text.partition("=")
    if not sep or not root:
        raise VolumeConfigError(f"disk {text!r}: expected NAME=DIR")
    if not _DISK_NAME.fullmatch(name):
        raise VolumeConfigError(f"disk {text!r}: the name must be 1 to 64 of A-Z a-z 0-9 . _ -, "
                                "starting with a letter or digit")
    return Disk("/" + name, check_path(Path(root)))


def check_disks(disks: Sequence[Disk]) -> None:
    """Several disks behind one nginx: distinct names, and roots that are neither the same
    nor inside one another (one disk's listing would show the other's tree)."""
    if not disks:
        raise VolumeConfigError("no disk: give --root DIR, or --disk NAME=DIR once per disk")
    if len(disks) > 1 and any(not d.prefix for d in disks):
        raise VolumeConfigError("a disk without a name can only be the volume's one disk")
    prefixes = [d.prefix for d in disks]
    if len(set(prefixes)) != len(prefixes):
        raise VolumeConfigError("disks: a name is given twice")
    for i, a in enumerate(disks):
        for b in disks[i + 1:]:
            if a.root == b.root or a.root in b.root.parents or b.root in a.root.parents:
                raise VolumeConfigError(f"disks: {a.root} and {b.root} overlap")


def worker_limits(soft: int, hard: int) -> tuple[int, int]:
    """(worker_rlimit_nofile, worker_connections) for this process's RLIMIT_NOFILE.

    nginx sets its workers' limit to worker_rlimit_nofile, which an unprivileged process may
    raise up to its hard limit (the soft one is often 1024, the hard one much more), so the
    hard limit is what a worker can have. Half of it (FDS_PER_CONNECTION) are connections,
    within MIN_CONNECTIONS..MAX_CONNECTIONS.
    """
    ceiling = MAX_CONNECTIONS * FDS_PER_CONNECTION
    usable = [n for n in (hard, soft) if n != resource.RLIM_INFINITY and n > 0]
    nofile = min(usable[0], ceiling) if usable else ceiling
    connections = max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, nofile // FDS_PER_CONNECTION))
    return nofile, connections


def substitute(template: str, values: Mapping[str, str], what: str) -> str:
    """envsubst's rule for `${NAME}`, for exactly these names: nginx's own `$uri`-style
    variables must survive, and a placeholder the renderer does not know is an error."""
    def one(match: re.Match[str]) -> str:
        if match[1] not in values:
            raise VolumeConfigError(f"{what} uses a placeholder this renderer does not know: "
                                    f"{match[0]}")
        return values[match[1]]
    return _PLACEHOLDER.sub(one, template)


def render_server_block(
    template: str,
    *,
    listen: str,
    access_log: Path,
    disks_conf: Path,
    writers: Sequence[Network],
    secret: str = "",
    name: str | None = None,
) -> str:
    """The server of volume.conf.template; its variables are named after `listen` unless
    `name` is given."""
    problem = secret_problem(secret)
    if problem:
        raise VolumeConfigError(problem)
    return substitute(template, {
        "MKV_VOLUME_LISTEN": listen,
        "MKV_VOLUME_NAME": name or volume_name(listen),
        "MKV_VOLUME_ACCESS_LOG": str(access_log),
        "MKV_VOLUME_WRITERS_GEO": geo_entries(writers),
        "MKV_REDIRECT_SECRET": secret,
        "MKV_VOLUME_DISKS": str(disks_conf),
    }, SERVER_TEMPLATE)


def render_disk_block(template: str, disk: Disk) -> str:
    """One disk's locations, from disk.conf.template."""
    return substitute(template, {"MKV_VOLUME_PREFIX": disk.prefix,
                                 "MKV_VOLUME_ROOT": str(disk.root)}, DISK_TEMPLATE)


def render_main_config(
    template: str,
    *,
    workdir: Path,
    server_conf: Path,
    user_line: str,
    worker_processes: int | str,
    error_log_level: str,
    limits: tuple[int, int] | None = None,
) -> str:
    """Fill the main config; substitute() fails loudly on a placeholder we forgot. `limits`
    is (worker_rlimit_nofile, worker_connections), by default from this process's limit."""
    nofile, connections = limits or worker_limits(*resource.getrlimit(resource.RLIMIT_NOFILE))
    return Template(template).substitute(
        USER_LINE=user_line,
        WORKDIR=str(workdir),
        SERVER_CONF=str(server_conf),
        WORKER_PROCESSES=str(worker_processes),
        WORKER_RLIMIT_NOFILE=str(nofile),
        WORKER_CONNECTIONS=str(connections),
        ERROR_LOG_LEVEL=error_log_level,
    )


def check_path(path: Path) -> Path:
    """Make a path absolute and refuse ones that cannot be written into the config verbatim."""
    path = path.expanduser().absolute()
    if _UNSAFE_PATH_CHARS & set(str(path)):
        raise VolumeConfigError(f"path contains characters nginx config cannot hold: {path}")
    return path


def as_disks(disks: Path | Sequence[Disk]) -> tuple[Disk, ...]:
    """A bare directory is the one disk of a volume without prefix (`--root`)."""
    if isinstance(disks, (str, Path)):
        return (Disk("", check_path(Path(disks))),)
    return tuple(Disk(d.prefix, check_path(d.root)) for d in disks)


# --- files and processes ----------------------------------------------------------------------


def user_line(root: Path) -> str:
    """As root, run workers as the data directory's owner; nginx would pick `nobody` otherwise.

    Not running as root, nginx ignores `user` (with a warning), so the line is left out.
    """
    if os.geteuid() != 0:
        return ""
    st = root.stat()
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        # An owner with no passwd entry (a bind mount from elsewhere): nginx only takes names.
        user, group = "root", "root"
    return f"user {user} {group};"


def write_private(path: Path, text: str) -> None:
    """Replace path with text, readable by its owner only (it may hold the redirect secret),
    whatever mode an older rendering had: a new file, renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CONF_MODE)
    try:
        os.fchmod(fd, CONF_MODE)  # an earlier, interrupted rendering may have left tmp
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def render_volume(
    disks: Path | Sequence[Disk],
    listen: str,
    workdir: Path,
    *,
    writers: Sequence[Network] | None = None,
    secret: str = "",
    worker_processes: int | str = "auto",
    error_log_level: str = "warn",
) -> Path:
    """Write nginx.conf, volume.conf and disks.conf (mode 0600) into workdir and return
    nginx.conf's path; the volume's access log goes to workdir/access.log (`nginx -s reopen`
    after rotating it). `disks` is a directory (one disk, no prefix) or Disks.

    Creates each disk's root and spool directory, and workdir: nginx itself only creates the
    last component of a temp path, and cannot create the data root at all.
    """
    disks = as_disks(disks)
    check_disks(disks)
    workdir = check_path(workdir)
    writers = tuple(writers) if writers is not None else parse_writers(DEFAULT_WRITERS)
    source = templates_dir()
    server_conf, disks_conf, main_conf = (workdir / n for n in (SERVER_CONF, DISKS_CONF, MAIN_CONF))
    server = render_server_block((source / SERVER_TEMPLATE).read_text(), listen=listen,
                                 access_log=workdir / ACCESS_LOG_NAME, disks_conf=disks_conf,
                                 writers=writers, secret=secret)
    disk_template = (source / DISK_TEMPLATE).read_text()
    locations = "\n".join(render_disk_block(disk_template, disk) for disk in disks)
    for disk in disks:
        if disk.root.exists() and not disk.root.is_dir():
            raise VolumeConfigError(f"volume root is not a directory: {disk.root}")
    for disk in disks:
        (disk.root / SPOOL_DIRNAME).mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    write_private(server_conf, server)
    write_private(disks_conf, locations)
    write_private(main_conf, render_main_config(
        (source / MAIN_TEMPLATE).read_text(),
        workdir=workdir,
        server_conf=server_conf,
        user_line=user_line(disks[0].root),
        worker_processes=worker_processes,
        error_log_level=error_log_level,
    ))
    return main_conf


def volume_command(conf: Path, workdir: Path, nginx: str | None = None) -> list[str]:
    """nginx argv for a rendered config.

    -p makes relative paths resolve in workdir, and -e stderr (nginx >= 1.19.5) keeps nginx from
    opening the compiled-in error log before it has read the config.
    """
    return [nginx or find_nginx(), "-c", str(conf), "-p", f"{workdir}/", "-e", "stderr"]


def default_workdir(disks: Path | Sequence[Disk]) -> Path:
    """The first disk's .nginx: beside the data, so a volume needs no other writable path."""
    return as_disks(disks)[0].root / WORKDIR_NAME


def run_volume(
    disks: Path | Sequence[Disk],
    port: int,
    bind: str = "127.0.0.1",
    workdir: Path | None = None,
    *,
    writers: Sequence[Network] | None = None,
    secret: str = "",
) -> NoReturn:
    """Replace this process with nginx serving the disks, so signals and exit status are
    nginx's."""
    nginx = find_nginx()
    workdir = check_path(workdir if workdir is not None else default_workdir(disks))
    conf = render_volume(disks, listen_address(bind, port), workdir, writers=writers,
                         secret=secret)
    argv = volume_command(conf, workdir, nginx)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


# --- `mkv volume` -------------------------------------------------------------------------------


def add_volume_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `mkv volume`, added to whichever (configargparse-compatible) parser the CLI owns."""
    parser.add_argument("--root", type=Path, default=None,
                        help="data directory of a volume with one disk (mkv's host:port)")
    parser.add_argument("--disk", action="append", default=None, metavar="NAME=DIR",
                        help="one of several disks behind this nginx, served under /NAME (mkv's "
                             "host:port/NAME), uploads spooled in DIR/.tmp; once per disk, "
                             "instead of --root")
    parser.add_argument("--port", type=int, required=True, help="TCP port nginx listens on")
    parser.add_argument(
        "--bind", default="127.0.0.1", help="address nginx listens on (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help=f"nginx config, pid, access log and temp files (default: ROOT/{WORKDIR_NAME}, "
             "the first disk's)",
    )
    parser.add_argument(
        "--writers", default=DEFAULT_WRITERS, metavar="CIDR,...",
        help="addresses that may PUT, DELETE and list: mkv's own (default: "
             f"{DEFAULT_WRITERS}); others get 403 and may only GET and HEAD blobs")
    parser.add_argument(
        "--redirect-secret", default="", metavar="SECRET",
        help="the service's redirect-secret: then a GET or HEAD from outside --writers needs "
             "mkv's signature (default: none, reads are open); better in the config file, "
             "where `ps` does not show it")


def disks_of(args: argparse.Namespace) -> tuple[Disk, ...]:
    """--root DIR or --disk NAME=DIR..., exactly one of the two."""
    root, disks = getattr(args, "root", None), getattr(args, "disk", None) or []
    if root is not None and disks:
        raise VolumeConfigError("--root and --disk exclude each other: --root DIR for one disk, "
                                "--disk NAME=DIR once per disk for several")
    if root is None and not disks:
        raise VolumeConfigError("no disk: give --root DIR, or --disk NAME=DIR once per disk")
    found = as_disks(Path(root)) if root is not None else tuple(parse_disk(d) for d in disks)
    check_disks(found)
    for disk in found:
        if disk.root.exists() and not disk.root.is_dir():
            flag = "--root" if root is not None else f"--disk {disk.prefix[1:]}"
            raise VolumeConfigError(f"{flag} is not a directory: {disk.root}")
    return found


def volume_main(args: argparse.Namespace) -> int:
    """Entry point of `mkv volume`; returns only on error (2: bad arguments, 1: no nginx)."""
    try:
        listen_address(args.bind, args.port)
        disks = disks_of(args)
        writers = parse_writers(getattr(args, "writers", DEFAULT_WRITERS))
        secret = getattr(args, "redirect_secret", "")
        problem = secret_problem(secret)
        if problem:
            raise VolumeConfigError(problem)
        run_volume(disks, args.port, args.bind, getattr(args, "workdir", None),
                   writers=writers, secret=secret)
    except VolumeConfigError as exc:
        print(f"mkv volume: error: {exc}", file=sys.stderr)
        return 2
    except (NginxNotFound, TemplateNotFound) as exc:
        print(f"mkv volume: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # Typically the root or workdir cannot be created: a usage problem, reported in one line.
        where = f" {exc.filename}" if exc.filename else ""
        print(f"mkv volume: error: cannot prepare{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2

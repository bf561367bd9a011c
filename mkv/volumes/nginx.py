"""Run one mkv volume: stock nginx configured from deploy/nginx/.

A volume is nothing but nginx serving a directory (docs/design.md, "Volumes and the
on-disk format"), so this module only renders the two templates and hands the process over to nginx.
Rendering is pure file output, testable without nginx; `run_volume` execs nginx in the
foreground so a supervisor's SIGTERM/SIGINT reach nginx itself, with no Python in between.

Templates are looked up in `$MKV_NGINX_TEMPLATES`, then in the checkout (deploy/nginx), then
where an installed wheel puts them (<prefix>/share/mkv/nginx).
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import sys
from pathlib import Path
from string import Template
from typing import NoReturn

MAIN_TEMPLATE = "nginx.conf.template"
SERVER_TEMPLATE = "volume.conf.template"
TEMPLATES_ENV = "MKV_NGINX_TEMPLATES"
#: deploy/nginx of the checkout this module runs from
CHECKOUT_TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
#: where an installed wheel puts them (setup.cfg, data_files): <prefix>/share/mkv/nginx
INSTALLED_TEMPLATES = Path(sys.prefix) / "share" / "mkv" / "nginx"

# Placeholders of the server block: the docker image renders the same file with envsubst, so
# these are the only three it may use (see the template's header).
LISTEN_PLACEHOLDER = "${MKV_VOLUME_LISTEN}"
ROOT_PLACEHOLDER = "${MKV_VOLUME_ROOT}"
ACCESS_LOG_PLACEHOLDER = "${MKV_VOLUME_ACCESS_LOG}"

# Where nginx spools request bodies before renaming them into place; on the data filesystem.
SPOOL_DIRNAME = ".tmp"
# Default per-volume runtime directory. Dot-named: mkv only reads two-hex-char directories,
# autoindex hides it and the server block refuses dot paths.
WORKDIR_NAME = ".nginx"
# The volume's access log, in its work directory: one line per request, with mkv's request id.
ACCESS_LOG_NAME = "access.log"

# Characters that would end or reinterpret a quoted nginx string ($ starts a variable in
# `root`), so a path holding them cannot be written into the config safely.
_UNSAFE_PATH_CHARS = frozenset('"\\$;{}\n\r\t')


class NginxNotFound(RuntimeError):
    """No nginx binary: volumes cannot run on this machine until it is installed."""


class TemplateNotFound(FileNotFoundError):
    """The deploy/nginx templates are not where this installation expected them."""


class VolumeConfigError(ValueError):
    """A root, listen address or port nginx could not be configured with."""


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
        if (candidate / MAIN_TEMPLATE).is_file() and (candidate / SERVER_TEMPLATE).is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise TemplateNotFound(
        f"nginx templates ({MAIN_TEMPLATE}, {SERVER_TEMPLATE}) not found in: {searched}; "
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


def render_server_block(template: str, root: Path, listen: str, access_log: Path) -> str:
    """Substitute only our three placeholders: nginx's own `$uri`-style variables must survive."""
    text = (template.replace(LISTEN_PLACEHOLDER, listen).replace(ROOT_PLACEHOLDER, str(root))
            .replace(ACCESS_LOG_PLACEHOLDER, str(access_log)))
    if "${MKV_" in text:
        raise VolumeConfigError(f"{SERVER_TEMPLATE} uses a placeholder this renderer does not know")
    return text


def render_main_config(
    template: str,
    *,
    workdir: Path,
    server_conf: Path,
    user_line: str,
    worker_processes: int | str,
    error_log_level: str,
) -> str:
    """Fill the main config; substitute() fails loudly on a placeholder we forgot."""
    return Template(template).substitute(
        USER_LINE=user_line,
        WORKDIR=str(workdir),
        SERVER_CONF=str(server_conf),
        WORKER_PROCESSES=str(worker_processes),
        ERROR_LOG_LEVEL=error_log_level,
    )


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


def _check_path(path: Path) -> Path:
    """Make a path absolute and refuse ones that cannot be written into the config verbatim."""
    path = path.expanduser().absolute()
    if _UNSAFE_PATH_CHARS & set(str(path)):
        raise VolumeConfigError(f"path contains characters nginx config cannot hold: {path}")
    return path


def render_volume(
    root: Path,
    listen: str,
    workdir: Path,
    *,
    worker_processes: int | str = 2,
    error_log_level: str = "warn",
) -> Path:
    """Write nginx.conf and volume.conf into workdir and return nginx.conf's path; the
    volume's access log goes to workdir/access.log (`nginx -s reopen` after rotating it).

    Creates root, its spool directory and workdir: nginx itself only creates the last component
    of a temp path, and cannot create the data root at all.
    """
    root = _check_path(root)
    workdir = _check_path(workdir)
    if root.exists() and not root.is_dir():
        raise VolumeConfigError(f"volume root is not a directory: {root}")
    (root / SPOOL_DIRNAME).mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)

    source = templates_dir()
    server_conf = workdir / "volume.conf"
    main_conf = workdir / "nginx.conf"
    server_conf.write_text(
        render_server_block((source / SERVER_TEMPLATE).read_text(), root, listen,
                            workdir / ACCESS_LOG_NAME)
    )
    main_conf.write_text(
        render_main_config(
            (source / MAIN_TEMPLATE).read_text(),
            workdir=workdir,
            server_conf=server_conf,
            user_line=user_line(root),
            worker_processes=worker_processes,
            error_log_level=error_log_level,
        )
    )
    return main_conf


def volume_command(conf: Path, workdir: Path, nginx: str | None = None) -> list[str]:
    """nginx argv for a rendered config.

    -p makes relative paths resolve in workdir, and -e stderr (nginx >= 1.19.5) keeps nginx from
    opening the compiled-in error log before it has read the config.
    """
    return [nginx or find_nginx(), "-c", str(conf), "-p", f"{workdir}/", "-e", "stderr"]


def run_volume(
    root: Path, port: int, bind: str = "127.0.0.1", workdir: Path | None = None
) -> NoReturn:
    """Replace this process with nginx serving root, so signals and exit status are nginx's."""
    nginx = find_nginx()
    root = _check_path(Path(root))
    workdir = _check_path(workdir if workdir is not None else root / WORKDIR_NAME)
    conf = render_volume(root, listen_address(bind, port), workdir)
    argv = volume_command(conf, workdir, nginx)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def add_volume_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `mkv volume`, added to whichever (configargparse-compatible) parser the CLI owns."""
    parser.add_argument("--root", type=Path, required=True, help="data directory of the volume")
    parser.add_argument("--port", type=int, required=True, help="TCP port nginx listens on")
    parser.add_argument(
        "--bind", default="127.0.0.1", help="address nginx listens on (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help=f"nginx config, pid and temp files (default: ROOT/{WORKDIR_NAME})",
    )


def volume_main(args: argparse.Namespace) -> int:
    """Entry point of `mkv volume`; returns only on error (2: bad arguments, 1: no nginx)."""
    try:
        listen_address(args.bind, args.port)
        root = _check_path(Path(args.root))
        if root.exists() and not root.is_dir():
            raise VolumeConfigError(f"--root is not a directory: {root}")
        run_volume(root, args.port, args.bind, getattr(args, "workdir", None))
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

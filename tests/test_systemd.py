"""deploy/systemd: the units an operator installs, checked three ways.

1. `systemd-analyze verify` on each unit. It checks that ExecStart's binary exists, so it
   runs on a copy with the install prefix (/opt/mkv/bin) replaced by this virtualenv's
   bin directory; the committed file stays the one an operator installs. Any warning
   about the unit (an unknown or misspelt key) fails the test, as does a non-zero exit.
2. The units as data: the commands, ExecReload's SIGHUP, the stop sequence and its
   timeout against gunicorn's graceful timeout, the hardening keys; sysusers.d and
   tmpfiles.d files applied to a scratch root by systemd's own tools.
3. The units' commands for real (as root: mount namespaces): the volume's and the
   service's ExecStart, rendered with test paths and run under an emulation of the
   units' sandbox: the whole filesystem read-only except the unit's ReadWritePaths and
   a private TMPDIR (ProtectSystem=strict, PrivateTmp), no new privileges, no
   capabilities (for mkv serve), and the kernel's PR_SET_MDWE, the equivalent of
   MemoryDenyWriteExecute. PUT and GET go through them, ExecReload applies a changed
   file, and the stop signal alone (KillMode=mixed) stops every process of the unit.

systemd-analyze, systemd-sysusers and systemd-tmpfiles come with Debian's systemd
package, which `make test` installs when missing (Makefile, `systemd-analyze`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mkv.config import Config
from mkv.service.server import gunicorn_settings
from mkv.service.supervise import Child
from mkv.writer.lockfile import writer_running
from tests.cluster import free_port, group_alive
from tests.helpers import REPO, wait_until

UNITS = REPO / "deploy" / "systemd"
SERVICE = UNITS / "mkv.service"
VOLUME = UNITS / "mkv-volume@.service"
PREFIX = "/opt/mkv/bin"
VENV_BIN = Path(sys.prefix) / "bin"
NEEDS_ANALYZE = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed: `make test` installs Debian's systemd package "
           "(or: apt-get install systemd)")
HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
    "ProtectHome": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "", "AmbientCapabilities": "",
}


# --- reading units ------------------------------------------------------------------------------


@dataclasses.dataclass
class Unit:
    """A unit file's settings: section -> key -> every value given, in order."""

    sections: dict[str, dict[str, list[str]]]

    @classmethod
    def parse(cls, text: str) -> Unit:
        sections: dict[str, dict[str, list[str]]] = {}
        current: dict[str, list[str]] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
                continue
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
        return cls(sections)

    def get(self, key: str, section: str = "Service") -> str:
        """The value in force: the last one given."""
        values = self.sections.get(section, {}).get(key)
        assert values, f"{key}= missing from [{section}]"
        return values[-1]


def render(unit: Path, replace: dict[str, str]) -> str:
    text = unit.read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def env_file(text: str) -> dict[str, str]:
    """KEY=value lines, as systemd's EnvironmentFile= reads them (the subset used here)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip("\"'")
    return out


def command(line: str, env: dict[str, str]) -> list[str]:
    """An Exec line as systemd runs it: words split as by a shell, `${X}` replaced within a
    word, and a word that is exactly `$X` replaced by X's value split at whitespace."""
    words: list[str] = []
    for word in shlex.split(line):
        bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if bare:
            words += env.get(bare[1], "").split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                lambda m: env.get(m[1], ""), word))
    return words


def verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True,
                          text=True, timeout=60)


def complaints(proc: subprocess.CompletedProcess[str], where: Path) -> list[str]:
    """verify's lines about the units in `where` (it may also talk about the host's units)."""
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if str(where) in line or "mkv" in line]


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    """Both units with this virtualenv's bin directory for the install prefix."""
    assert (VENV_BIN / "mkv").is_file(), f"no mkv in {VENV_BIN}: run `make venv`"
    out = tmp_path / "units"
    out.mkdir()
    for unit in (SERVICE, VOLUME):
        (out / unit.name).write_text(render(unit, {PREFIX: str(VENV_BIN)}))
    return out


# --- 1. systemd-analyze verify ------------------------------------------------------------------


@NEEDS_ANALYZE
def test_systemd_analyze_verifies_both_units(rendered: Path) -> None:
    proc = verify(rendered / "mkv.service", rendered / "mkv-volume@.service",
                  rendered / "mkv-volume@disk1.service")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert complaints(proc, rendered) == []


@NEEDS_ANALYZE
def test_verify_catches_a_misspelt_key_and_a_missing_binary(rendered: Path) -> None:
    """What the check above relies on: verify does complain about our kind of mistake."""
    unit = rendered / "mkv.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSytem="))
    assert any("ProtectSytem" in line for line in complaints(verify(unit), rendered))
    unit.write_text(SERVICE.read_text())  # /opt/mkv/bin/mkv does not exist here
    missing = verify(unit)
    assert missing.returncode != 0
    assert any(f"{PREFIX}/mkv" in line for line in complaints(missing, rendered))


# --- 2. the units as data -----------------------------------------------------------------------


def test_mkv_service_runs_serve_reloads_with_hup_and_outlasts_the_graceful_stop() -> None:
    unit = Unit.parse(SERVICE.read_text())
    assert unit.get("ExecStart") == f"{PREFIX}/mkv serve --config /etc/mkv/mkv.conf"
    assert unit.get("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit.get("Type") in ("simple", "exec")  # gunicorn does not sd_notify
    assert (unit.get("User"), unit.get("Group")) == ("mkv", "mkv")
    assert unit.get("KillMode") == "mixed"
    assert unit.get("KillSignal") == "SIGTERM"  # gunicorn's graceful stop
    assert unit.get("Restart") == "on-failure"
    # the master drains its workers, then stops the health process and the writer in turn
    graceful = gunicorn_settings(Config(volumes=()))["graceful_timeout"]
    child_stop = inspect.signature(Child.stop).parameters["timeout"].default
    assert int(unit.get("TimeoutStopSec")) > graceful + 2 * child_stop
    # every file beside the index may be written: the default db's directory
    assert str(Path(Config(volumes=()).db).parent) in unit.get("ReadWritePaths").split()


def test_the_volume_unit_serves_its_disk_from_its_environment_file() -> None:
    unit = Unit.parse(VOLUME.read_text())
    start = unit.get("ExecStart")
    assert start.startswith(f"{PREFIX}/mkv volume --root /srv/%i ")
    assert unit.get("EnvironmentFile") == "/etc/mkv/volume-%i.conf"
    assert unit.get("ReadWritePaths") == "/srv/%i"
    assert unit.get("RequiresMountsFor", "Unit") == "/srv/%i"
    assert (unit.get("User"), unit.get("KillMode"), unit.get("KillSignal")) == (
        "mkv", "mixed", "SIGQUIT")  # nginx's graceful shutdown, to the master
    example = env_file((UNITS / "volume.conf.example").read_text())
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", start))
    assert used <= set(example), f"volume.conf.example lacks {used - set(example)}"
    argv = command(start.replace("%i", "disk1"), example)
    assert argv == [f"{PREFIX}/mkv", "volume", "--root", "/srv/disk1", "--port", "3001",
                    "--bind", "0.0.0.0"]


@pytest.mark.parametrize("unit", [SERVICE, VOLUME], ids=lambda p: p.name)
def test_hardening(unit: Path) -> None:
    parsed = Unit.parse(unit.read_text())
    wrong = {key: parsed.sections["Service"].get(key) for key, value in HARDENING.items()
             if parsed.sections["Service"].get(key, [None])[-1] != value}
    assert wrong == {}, f"hardening keys missing or different in {unit.name}"
    assert parsed.get("ReadWritePaths")


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles")
                    is None, reason="systemd-sysusers and systemd-tmpfiles are not installed: "
                    "`make test` installs Debian's systemd package")
def test_sysusers_and_tmpfiles_make_the_user_and_its_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for tool, conf, extra in (("systemd-sysusers", "mkv.sysusers", []),
                              ("systemd-tmpfiles", "mkv.tmpfiles", ["--create"])):
        proc = subprocess.run([tool, f"--root={root}", *extra, str(UNITS / conf)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert users["mkv"][5:] == ["/var/lib/mkv", "/usr/sbin/nologin"]
    uid, gid = int(users["mkv"][2]), int(users["mkv"][3])
    state = (root / "var/lib/mkv").stat()
    assert (state.st_uid, state.st_gid, state.st_mode & 0o7777) == (uid, gid, 0o750)
    etc = (root / "etc/mkv").stat()
    assert (etc.st_uid, etc.st_gid, etc.st_mode & 0o7777) == (0, gid, 0o750)


# --- 3. the commands for real, in an emulation of the units' sandbox ----------------------------

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def deny_write_execute() -> None:
    """preexec_fn: from here on no mapping may be writable and executable (inherited by
    every child and across exec), as MemoryDenyWriteExecute= does with seccomp."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def mdwe_supported() -> bool:
    probe = "import mmap; mmap.mmap(-1, 4096, prot=7)"  # read, write and execute
    try:
        proc = subprocess.run([sys.executable, "-c", probe], preexec_fn=deny_write_execute,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode != 0 and b"PermissionError" in proc.stderr


SANDBOX_SCRIPT = """
for dir in $MKV_TEST_RW; do mount --bind "$dir" "$dir"; done
mount -o remount,bind,ro /
exec setpriv --no-new-privs $MKV_TEST_CAPS -- "$@"
"""


def sandboxed(argv: list[str], rw: list[str], *, caps: bool) -> list[str]:
    """argv run with / read-only but `rw` (each must exist), no new privileges and, unless
    `caps`, an empty capability bounding set. The caller adds deny_write_execute."""
    assert all(Path(p).is_dir() for p in rw), rw
    drop = "" if caps else "--bounding-set=-all --inh-caps=-all"
    return ["unshare", "--mount", "--propagation", "private", "--", "env",
            f"MKV_TEST_RW={' '.join(rw)}", f"MKV_TEST_CAPS={drop}",
            "sh", "-ec", SANDBOX_SCRIPT, "sh", *argv]


class Running:
    """A unit's main process, in a session of its own; its log in a file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         env=env, start_new_session=True,
                                         preexec_fn=deny_write_execute)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of pid's live children."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                out.append((int(stat.parent.name), cmdline.decode(errors="replace")))
        except (OSError, ValueError, IndexError):
            continue
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Stand-ins for the install's directories, and the unit text with them substituted."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the sandbox emulation uses mount namespaces")
    if not all(shutil.which(t) for t in ("unshare", "setpriv")):
        pytest.skip("needs util-linux's unshare and setpriv")
    if not mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux 6.3+) to emulate MemoryDenyWriteExecute")
    paths = {PREFIX: str(VENV_BIN)}
    for name in ("/etc/mkv", "/var/lib/mkv", "/srv", "/run/private-tmp"):
        stand_in = tmp_path / name.strip("/").replace("/", "-")
        stand_in.mkdir()
        paths[name] = str(stand_in)
    yield paths


SANDBOX_PROBE = """
import errno, mmap, sys
from pathlib import Path
rw, ro = Path(sys.argv[1]), Path(sys.argv[2])
(rw / "written").write_text("ok")
try:
    (ro / "written").write_text("no")
    print("ro writable")
except OSError as exc:
    print("ro", errno.errorcode[exc.errno])
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx allowed")
except PermissionError:
    print("wx denied")
status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines())
print("CapBnd", status["CapBnd"].strip(), "NoNewPrivs", status["NoNewPrivs"].strip())
"""


def test_the_sandbox_emulation_denies_what_the_units_deny(host: dict[str, str],
                                                           tmp_path: Path) -> None:
    """The control for the test below: its sandbox really is read-only outside the
    writable paths, without capabilities, new privileges or writable-executable memory."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    argv = sandboxed([sys.executable, "-c", SANDBOX_PROBE, str(rw), str(ro)], [str(rw)], caps=False)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          preexec_fn=deny_write_execute)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == [
        "ro EROFS", "wx denied", "CapBnd 0000000000000000 NoNewPrivs 1"], proc.stdout
    assert (rw / "written").read_text() == "ok"
    assert not (ro / "written").exists()


def test_the_units_commands_serve_reload_and_stop_in_their_sandbox(
        host: dict[str, str], tmp_path: Path) -> None:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MKV_")}
    base_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    private_tmp = host.pop("/run/private-tmp")
    base_env["TMPDIR"] = private_tmp  # PrivateTmp: a /tmp of the unit's own

    # the volume: mkv-volume@disk1 with its EnvironmentFile from the example
    volume_unit = Unit.parse(render(VOLUME, host).replace("%i", "disk1"))
    disk = Path(host["/srv"]) / "disk1"
    disk.mkdir()
    port = free_port()
    settings = {**env_file((UNITS / "volume.conf.example").read_text()),
                "MKV_VOLUME_PORT": str(port), "MKV_VOLUME_BIND": "127.0.0.1"}
    argv = command(volume_unit.get("ExecStart"), settings)
    assert argv[argv.index("--root") + 1] == str(disk)
    volume = Running(sandboxed(argv, volume_unit.get("ReadWritePaths").split(), caps=True),
                     tmp_path / "volume.log", base_env)
    service = None
    try:
        wait_until(lambda: not volume.alive() or _answers(port), 20, "the volume to answer")
        assert volume.alive(), volume.output()
        assert requests.get(f"http://127.0.0.1:{port}/-/ping", timeout=5).text == "ok\n"

        # the service: mkv.service with a configuration in the stand-in /etc/mkv
        unit = Unit.parse(render(SERVICE, host))
        state = Path(host["/var/lib/mkv"])
        conf = Path(host["/etc/mkv"]) / "mkv.conf"
        svc_port = free_port()
        conf.write_text(f"volumes = 127.0.0.1:{port}\nreplicas = 1\ndb = {state}/index.db\n"
                        f"port = {svc_port}\nworkers = 1\nthreads = 4\n")
        argv = command(unit.get("ExecStart"), {})
        assert argv[-2:] == ["--config", str(conf)]
        rw = [*unit.get("ReadWritePaths").split(), private_tmp]
        service = Running(sandboxed(argv, rw, caps=False), tmp_path / "serve.log", base_env)
        url = f"http://127.0.0.1:{svc_port}"
        wait_until(lambda: not service.alive() or _answers(svc_port), 30, "mkv serve to answer")
        assert service.alive(), service.output()
        assert requests.put(f"{url}/sandboxed", data=b"under systemd", timeout=10).status_code == 201
        got = requests.get(f"{url}/sandboxed", timeout=10)
        assert (got.status_code, got.content) == (200, b"under systemd")

        # ExecReload: the master reads the changed file and runs two workers
        master = service.proc.pid
        workers = lambda: [p for p, cmd in children(master) if "mkv serve" in cmd]  # noqa: E731
        assert len(workers()) == 1
        conf.write_text(conf.read_text().replace("workers = 1", "workers = 2"))
        reload = command(unit.get("ExecReload"), {"MAINPID": str(master)})
        subprocess.run(reload, check=True, timeout=10)
        wait_until(lambda: len(workers()) == 2, 30, "two workers after the reload")
        assert requests.get(f"{url}/sandboxed", timeout=10).content == b"under systemd"

        # stop as KillMode=mixed does: KillSignal to the main process alone
        helpers = [p for p, cmd in children(master) if "mkv.writer" in cmd or "mkv.health" in cmd]
        assert len(helpers) == 2
        service.proc.send_signal(signal.Signals[unit.get("KillSignal")])
        assert service.proc.wait(float(unit.get("TimeoutStopSec"))) == 0, service.output()
        wait_until(lambda: not any(alive(p) for p in helpers), 10, "writer and health to exit")
        assert not writer_running(str(state / "index.db"))
        log = service.output()
        assert log.index("health stopped") < log.index("writer stopped"), log

        volume.proc.send_signal(signal.Signals[volume_unit.get("KillSignal")])
        assert volume.proc.wait(float(volume_unit.get("TimeoutStopSec"))) == 0, volume.output()
        wait_until(lambda: not group_alive(volume.proc.pid), 10, "nginx workers to exit")
    finally:
        for running in (service, volume):
            if running is not None:
                running.kill()


def _answers(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)
        return True
    except requests.RequestException:
        return False

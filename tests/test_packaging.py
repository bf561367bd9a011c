"""The wheel is what an operator installs: it must carry the nginx templates, the
example configuration and the systemd units, and `mkv volume` from an installed wheel,
run outside any checkout, must find those templates and start nginx.

The wheel is built from a copy of the working tree, into a temporary directory: setuptools
builds in the source tree (build/, mkv.egg-info), and a stale build/lib left there could
put modules deleted since into the wheel. It is installed with its dependencies into a
fresh virtualenv, the way an operator would (`pip install mkv-*.whl`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from mkv.keys import blob_path, sidecar_path
from tests.cluster import free_port, group_alive

ROOT = Path(__file__).resolve().parents[1]
#: What the build needs none of: caches, virtualenvs, data, earlier builds, bench output.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".hypothesis", ".ruff_cache", "results",
)
#: Files setup.cfg's data_files puts under <prefix>/share/mkv, and where they come from.
SHIPPED = {
    "share/mkv/nginx/nginx.conf.template": ROOT / "deploy/nginx/nginx.conf.template",
    "share/mkv/nginx/volume.conf.template": ROOT / "deploy/nginx/volume.conf.template",
    "share/mkv/nginx/disk.conf.template": ROOT / "deploy/nginx/disk.conf.template",
    "share/mkv/mkv.conf": ROOT / "etc/mkv.conf",
    **{f"share/mkv/systemd/{name}": ROOT / "deploy/systemd" / name
       for name in ("mkv.service", "mkv-volume@.service", "mkv.sysusers", "mkv.tmpfiles",
                    "volume.conf.example")},
}
START_TIMEOUT = 10.0


def _run(argv: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a build step; on failure, its output is the assertion message."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _clean_env() -> dict[str, str]:
    """The environment of an operator's shell: no mkv settings, nothing pointing at the checkout
    (and no config file: the machine's /etc/mkv/mkv.conf is not the test's)."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith("MKV_") and name not in ("PYTHONPATH", "VIRTUAL_ENV")
            } | {"MKV_CONFIG": ""}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"),
          str(src)], timeout=180)
    wheels = sorted((work / "dist").glob("mkv-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv (no system site-packages) with the wheel and its dependencies."""
    env_dir = tmp_path_factory.mktemp("installed") / "venv"
    _run([sys.executable, "-m", "venv", str(env_dir)], timeout=120)
    _run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
         timeout=300, env=_clean_env())
    return env_dir


def test_wheel_ships_the_nginx_templates_and_the_config(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        data = {name.split(".data/data/", 1)[1]: name for name in zf.namelist()
                if ".data/data/" in name}
        for installed_as, source in SHIPPED.items():
            assert installed_as in data, f"{installed_as} is not in {wheel.name}: {sorted(data)}"
            assert zf.read(data[installed_as]) == source.read_bytes(), f"{installed_as} differs"


def test_installed_mkv_finds_its_templates_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    code = ("import mkv, mkv.volumes.nginx as n; "
            "print(mkv.__file__); print(n.templates_dir())")
    out = _run([str(venv / "bin" / "python"), "-c", code], timeout=30, cwd=tmp_path,
               env=_clean_env()).stdout.splitlines()
    module, templates = Path(out[0]).resolve(), Path(out[1]).resolve()
    assert venv.resolve() in module.parents, f"mkv imported from {module}, not the virtualenv"
    assert templates == (venv / "share" / "mkv" / "nginx").resolve()


def test_installed_mkv_volume_serves_and_stops_on_sigterm(venv: Path, tmp_path: Path) -> None:
    """`mkv volume` of the installed wheel, from a directory outside the checkout."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert ROOT not in outside.resolve().parents
    root = tmp_path / "vol"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "mkv-volume.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [str(venv / "bin" / "mkv"), "volume", "--root", str(root), "--port", str(port)],
            cwd=outside, env=_clean_env(), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, (
                f"mkv volume exited with {proc.returncode}: {log.read_text(errors='replace')}")
            try:
                ping = requests.get(f"{url}/-/ping", timeout=1)
                if ping.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (
                f"mkv volume did not answer within {START_TIMEOUT:.0f}s: "
                f"{log.read_text(errors='replace')}")
            time.sleep(0.05)
        assert ping.text == "ok\n"

        # what the service does with a volume: a blob, then its sidecar, read back
        path = blob_path("/packaged")
        assert requests.put(url + path, data=b"from the wheel", timeout=5).status_code == 201
        assert requests.put(url + sidecar_path("/packaged"), data=b"{}\n", timeout=5).status_code == 201
        got = requests.get(url + path, timeout=5)
        assert (got.status_code, got.content) == (200, b"from the wheel")
        assert (root / path.lstrip("/")).read_bytes() == b"from the wheel"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        deadline = time.monotonic() + 5
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not group_alive(proc.pid), "nginx workers outlived their master"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/-/ping", timeout=1)
    finally:
        if proc.poll() is None or group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def test_every_installed_command_reports_the_wheels_version(venv: Path, wheel: Path,
                                                            tmp_path: Path) -> None:
    """--version comes from the installed package's metadata: the wheel's own version."""
    version = wheel.name.split("-")[1]
    for argv in (["mkv"], ["mkv", "serve"], ["mkv", "volume"], ["mkv-rebuild"],
                 ["mkv-rebalance"]):
        out = _run([str(venv / "bin" / argv[0]), *argv[1:], "--version"], timeout=30,
                   cwd=tmp_path, env=_clean_env()).stdout
        assert out == f"{' '.join(argv)} {version}\n", (argv, out)

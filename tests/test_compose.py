"""Static checks of the docker deployment, since docker itself cannot run in the test suite.

They pin what would otherwise drift silently: the volumes must run the same nginx template the
integration tests exercise, and the service must be pointed at exactly those volumes.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from mkv import config, core
from mkv.model import Record, State
from mkv.volumes import nginx as mkv_nginx
from tests.cluster import free_port, wait_http
from tests.helpers import TIMEOUT

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "./deploy/nginx/volume.conf.template"
TEMPLATE_TARGET = "/etc/nginx/templates/default.conf.template"
DISK_TEMPLATE = "./deploy/nginx/disk.conf.template"
DISK_TEMPLATE_TARGET = "/etc/nginx/templates/mkv/disk.conf.template"
VOLUME_SERVICES = ("vol1", "vol2", "vol3")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # PyYAML's safe loader resolves the x-volume anchor and `<<` merges the way compose does.
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax mounts as target -> "source[:mode]"."""
    result = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        result[target] = ":".join([source, *mode])
    return result


def command_args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


@pytest.mark.parametrize("name", VOLUME_SERVICES)
def test_volume_services_run_stock_nginx_with_the_project_template(
    compose: dict[str, Any], name: str
) -> None:
    service = compose["services"][name]
    assert re.fullmatch(r"nginx:[\w.-]+", service["image"])
    assert mounts(service)[TEMPLATE_TARGET] == f"{TEMPLATE}:ro"
    assert (REPO / TEMPLATE).is_file()
    assert mounts(service)[DISK_TEMPLATE_TARGET] == f"{DISK_TEMPLATE}:ro"
    env = service["environment"]
    assert str(env["MKV_VOLUME_LISTEN"]) == "80"
    assert env["MKV_VOLUME_ROOT"] == "/data"
    assert env["MKV_VOLUME_PREFIX"] == ""  # one disk at "/": mkv's volume is vol1:80
    # the stock image links this file to the container's stdout
    assert env["MKV_VOLUME_ACCESS_LOG"] == "/var/log/nginx/access.log"
    # the entrypoint renders templates/<path>.template into conf.d/<path>
    assert env["MKV_VOLUME_DISKS"] == "/etc/nginx/conf.d/mkv/disk.conf"
    assert re.fullmatch(r"[A-Za-z0-9_]+", env["MKV_VOLUME_NAME"])
    # envsubst leaves a placeholder whose variable is unset as it is: nginx would refuse it
    for template in (TEMPLATE, DISK_TEMPLATE):
        placeholders = set(re.findall(r"\$\{(\w+)\}", (REPO / template).read_text()))
        assert placeholders <= set(env), (template, placeholders - set(env))
    data_volume = mounts(service)["/data"]
    assert data_volume in compose["volumes"], "blobs must live in a named volume"


def geo(entries: str) -> dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str]:
    """MKV_VOLUME_WRITERS_GEO's "CIDR value;" entries, each checked."""
    parsed = {}
    for entry in filter(None, (e.strip() for e in entries.split(";"))):
        address, value = entry.split()
        assert value in ("0", "1"), entry
        parsed[ipaddress.ip_network(address)] = value
    return parsed


def test_the_writers_are_the_compose_network_but_its_gateway(compose: dict[str, Any]) -> None:
    """mkv reaches the volumes from inside the network; the host's clients come through the
    published ports, i.e. from the gateway, and must only read."""
    [pool] = compose["networks"]["default"]["ipam"]["config"]
    subnet, gateway = ipaddress.ip_network(pool["subnet"]), ipaddress.ip_address(pool["gateway"])
    for name in VOLUME_SERVICES:
        entries = geo(compose["services"][name]["environment"]["MKV_VOLUME_WRITERS_GEO"])
        assert entries == {subnet: "1", ipaddress.ip_network(f"{gateway}/32"): "0"}
    # only the one network: every container is on it, mkv included
    assert all("networks" not in service for service in compose["services"].values())


def test_signing_is_off_unless_one_secret_is_set_for_both(compose: dict[str, Any]) -> None:
    """Compose fills ${MKV_REDIRECT_SECRET:-} from the caller's environment or .env,
    empty by default: the same value for the service that signs and the volumes that check."""
    values = {compose["services"][name]["environment"]["MKV_REDIRECT_SECRET"]
              for name in (*VOLUME_SERVICES, "mkv")}
    assert values == {"${MKV_REDIRECT_SECRET:-}"}


def render_like_the_image(compose: dict[str, Any], tmp_path: Path, **override: str) -> Path:
    """What the nginx image's entrypoint makes of vol1's templates (envsubst of every variable
    set, templates/<path>.template into conf.d/<path>), with compose's interpolation of
    ${MKV_REDIRECT_SECRET:-} as given in `override` (default empty) and the container's
    paths moved under tmp_path; a main config standing in for the image's. Its path."""
    envsubst = shutil.which("envsubst")
    if envsubst is None:
        pytest.skip("envsubst (gettext-base) is not installed")
    service = compose["services"]["vol1"]
    conf_d = tmp_path / "conf.d"
    (conf_d / "mkv").mkdir(parents=True)
    (tmp_path / "data" / ".tmp").mkdir(parents=True)
    env = {name: str(value) for name, value in service["environment"].items()}
    env.update(MKV_REDIRECT_SECRET="", MKV_VOLUME_ROOT=str(tmp_path / "data"),
               MKV_VOLUME_ACCESS_LOG=str(tmp_path / "access.log"),
               MKV_VOLUME_DISKS=env["MKV_VOLUME_DISKS"].replace("/etc/nginx/conf.d",
                                                                str(conf_d)))
    env.update(override)
    names = " ".join(f"${{{name}}}" for name in env)
    for target, output in ((TEMPLATE_TARGET, conf_d / "default.conf"),
                           (DISK_TEMPLATE_TARGET, conf_d / "mkv" / "disk.conf")):
        source = mounts(service)[target].rsplit(":", 1)[0]
        with (REPO / source).open() as template, output.open("w") as out:
            subprocess.run([envsubst, names], stdin=template, stdout=out, env=env, check=True,
                           timeout=10)
    main = tmp_path / "nginx.conf"
    main.write_text(f'''{mkv_nginx.user_line(tmp_path / "data")}
daemon off; pid "{tmp_path}/nginx.pid"; error_log stderr warn; worker_processes 1;
events {{ }}
http {{
    client_body_temp_path "{tmp_path}/client_body"; proxy_temp_path "{tmp_path}/proxy";
    fastcgi_temp_path "{tmp_path}/fastcgi"; uwsgi_temp_path "{tmp_path}/uwsgi";
    scgi_temp_path "{tmp_path}/scgi";
    include "{conf_d}/*.conf";
}}
''')
    return main


@pytest.mark.parametrize("secret", ["", "a-shared-secret-of-the-stack"])
def test_the_volume_templates_render_a_config_nginx_accepts(
        compose: dict[str, Any], tmp_path: Path, secret: str) -> None:
    main = render_like_the_image(compose, tmp_path, MKV_REDIRECT_SECRET=secret)
    argv = mkv_nginx.volume_command(main, tmp_path)
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr


def test_the_rendered_volume_lets_only_the_compose_network_write(
        compose: dict[str, Any], tmp_path: Path) -> None:
    """Served for real (on a free port rather than 80): from this host, outside the compose
    network, a PUT is refused and the probe answers."""
    port = free_port()
    main = render_like_the_image(compose, tmp_path, MKV_VOLUME_LISTEN=f"127.0.0.1:{port}")
    proc = subprocess.Popen(mkv_nginx.volume_command(main, tmp_path), start_new_session=True,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_http(url + "/-/ping").text == "ok\n"
        assert requests.put(url + "/ab/cd/x", data=b"x", timeout=TIMEOUT).status_code == 403
        assert requests.get(url + "/", timeout=TIMEOUT).status_code == 403
        assert not (tmp_path / "data" / "ab").exists()
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_rendered_volume_fails_over_to_the_public_hosts_mkv_names(
        compose: dict[str, Any], tmp_path: Path) -> None:
    """A redirect mkv makes with the stack's --volumes (public URLs) names the other
    volumes' public hosts, and the volume rendered as in the image, lacking the blob,
    sends the client on to the next (docs/design.md, "Read failover")."""
    entries = flag(command_args(compose["services"]["mkv"]), "--volumes").split(",")
    public = dict(entry.split("=", 1) for entry in entries)
    record = Record("/k", State.LIVE, tuple(public), 1, "", 0.0, "abc")
    target = core.read_target("/k", record, {}, public=public)
    assert isinstance(target, core.Redirect)
    assert target.location.startswith("http://127.0.0.101/")
    assert target.location.endswith("?next=127.0.0.102,127.0.0.103")
    port = free_port()
    main = render_like_the_image(compose, tmp_path, MKV_VOLUME_LISTEN=f"127.0.0.1:{port}")
    proc = subprocess.Popen(mkv_nginx.volume_command(main, tmp_path), start_new_session=True,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/-/ping")
        resp = requests.get(url + target.location.removeprefix("http://127.0.0.101"),
                            allow_redirects=False, timeout=TIMEOUT)
        assert resp.status_code == 302
        assert resp.headers["Location"] == f"//127.0.0.102{target.path}?next=127.0.0.103"
    finally:
        proc.terminate()
        proc.wait(10)


def test_volume_services_have_separate_data(compose: dict[str, Any]) -> None:
    sources = {mounts(compose["services"][name])["/data"] for name in VOLUME_SERVICES}
    assert len(sources) == len(VOLUME_SERVICES)


def test_volume_entrypoint_still_renders_templates(compose: dict[str, Any]) -> None:
    """The stock entrypoint only runs envsubst when its first argument is `nginx`."""
    for name in VOLUME_SERVICES:
        script = " ".join(compose["services"][name]["entrypoint"])
        assert "exec /docker-entrypoint.sh nginx " in script


def test_mkv_service_builds_from_the_dockerfile(compose: dict[str, Any]) -> None:
    build = compose["services"]["mkv"]["build"]
    if isinstance(build, str):
        build = {"context": build}
    assert (REPO / build["context"]).resolve() == REPO
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"


def test_mkv_service_uses_all_three_volumes(compose: dict[str, Any]) -> None:
    service = compose["services"]["mkv"]
    args = command_args(service)
    assert args[:2] == ["mkv", "serve"]
    entries = dict(spec.split("=", 1) for spec in flag(args, "--volumes").split(","))
    assert sorted(e.split(":")[0] for e in entries) == sorted(VOLUME_SERVICES)
    # each volume's public URL is the address its port 80 is published on, so that
    # `curl -L localhost:3000/key` on the host follows the redirect
    for address, url in entries.items():
        published = [str(p) for p in compose["services"][address.split(":")[0]]["ports"]]
        host = url.removeprefix("http://")
        assert f"{host}:80:80" in published, (address, url, published)
        assert config.public_url(url) == url
    assert flag(args, "--port") == "3000"
    assert flag(args, "--bind") == "0.0.0.0"
    db = flag(args, "--db")
    assert any(db.startswith(target + "/") for target in mounts(service)), "index not persisted"
    assert "3000:3000" in [str(p) for p in service["ports"]]
    depends = service["depends_on"]
    assert set(depends) == set(VOLUME_SERVICES)


def test_the_mkv_service_is_checked_and_stopped_gracefully(compose: dict[str, Any]) -> None:
    service = compose["services"]["mkv"]
    check = " ".join(service["healthcheck"]["test"])
    assert "http://127.0.0.1:3000/-/health" in check
    grace = service["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > gunicorn_settings_graceful() + 2 * 10


def gunicorn_settings_graceful() -> int:
    from mkv.config import Config
    from mkv.service.server import gunicorn_settings

    return gunicorn_settings(Config(volumes=("a:1",)))["graceful_timeout"]


def test_dockerfile_installs_the_dependencies_before_the_source() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.MULTILINE)
    deps = re.search(r"^RUN .*pip install -r ", dockerfile, re.MULTILINE | re.DOTALL)
    source = re.search(r"^COPY \. \.", dockerfile, re.MULTILINE)
    package = re.search(r"^RUN pip install --no-deps \.(\s|$)", dockerfile, re.MULTILINE)
    assert deps and source and package
    assert deps.start() < source.start() < package.start()
    assert re.search(r"^COPY setup\.cfg \./", dockerfile, re.MULTILINE)


def test_the_dockerfile_reads_the_requirements_as_pip_would(tmp_path: Path) -> None:
    """The RUN line's own python -c, run here beside a copy of setup.cfg: it prints
    setup.cfg's install_requires, one requirement a line, as `pip install -r` reads them."""
    import configparser
    import shutil
    import subprocess
    import sys

    from packaging.requirements import Requirement

    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", "")
    code = re.search(r'python -c "([^"]+)"', dockerfile)[1]
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    printed = [Requirement(line.strip()) for line in out.splitlines() if line.strip()]
    c = configparser.ConfigParser()
    c.read(REPO / "setup.cfg")
    wanted = [line.strip() for line in c["options"]["install_requires"].splitlines() if line.strip()]
    assert [str(r) for r in printed] == wanted and "falcon>=4.0" in wanted

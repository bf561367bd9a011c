"""Static checks of the docker deployment, since docker itself cannot run in the test suite.

They pin what would otherwise drift silently: the volumes must run the same nginx template the
integration tests exercise, and the service must be pointed at exactly those volumes.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "./deploy/nginx/volume.conf.template"
TEMPLATE_TARGET = "/etc/nginx/templates/default.conf.template"
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
    env = service["environment"]
    assert str(env["MKV_VOLUME_LISTEN"]) == "80"
    assert env["MKV_VOLUME_ROOT"] == "/data"
    # the stock image links this file to the container's stdout
    assert env["MKV_VOLUME_ACCESS_LOG"] == "/var/log/nginx/access.log"
    # envsubst leaves a placeholder whose variable is unset as it is: nginx would refuse it
    placeholders = set(re.findall(r"\$\{(\w+)\}", (REPO / TEMPLATE).read_text()))
    assert placeholders <= set(env), placeholders - set(env)
    data_volume = mounts(service)["/data"]
    assert data_volume in compose["volumes"], "blobs must live in a named volume"


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
    hosts = [spec.split(":")[0] for spec in flag(args, "--volumes").split(",")]
    assert sorted(hosts) == sorted(VOLUME_SERVICES)
    assert flag(args, "--port") == "3000"
    assert flag(args, "--bind") == "0.0.0.0"
    db = flag(args, "--db")
    assert any(db.startswith(target + "/") for target in mounts(service)), "index not persisted"
    assert "3000:3000" in [str(p) for p in service["ports"]]
    depends = service["depends_on"]
    assert set(depends) == set(VOLUME_SERVICES)


def test_dockerfile_installs_the_package() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.MULTILINE)
    assert re.search(r"^RUN pip install \.(\s|$)", dockerfile, re.MULTILINE)
    assert re.search(r"^COPY \. \.", dockerfile, re.MULTILINE)


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "var"):
        assert path in ignored
    assert "README.md" not in ignored, "setup.cfg reads it as the long description"

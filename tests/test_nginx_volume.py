"""The volume contract mkv relies on, checked against real nginx run from deploy/nginx/.

If nginx or the templates change behaviour (status codes, autoindex shape, atomic PUT), these
tests say so before the service tests fail in a more confusing way.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from mkv.volumes import nginx as mkv_nginx
from tests.cluster import NginxVolume, VolumeStartError, free_port, group_alive, wait_http
from tests.helpers import REPO

KEY_HASH = hashlib.sha256(b"some key").hexdigest()
BLOB = f"/{KEY_HASH[:2]}/{KEY_HASH[2:4]}/{KEY_HASH}"
MiB = 1024 * 1024


@pytest.fixture
def volume(make_volumes: Callable[[int], list[NginxVolume]]) -> NginxVolume:
    return make_volumes(1)[0]


def listing(volume: NginxVolume, path: str) -> dict[str, dict]:
    """autoindex JSON of a directory, by entry name."""
    resp = requests.get(volume.url + path, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    return {entry["name"]: entry for entry in resp.json()}


def test_put_creates_nested_path_and_get_returns_exact_bytes(volume: NginxVolume) -> None:
    body = os.urandom(4096)
    resp = requests.put(volume.url + BLOB, data=body, timeout=5)
    assert resp.status_code == 201
    # nginx names the created resource, path only (absolute_redirect off).
    assert resp.headers.get("Location") == BLOB

    got = requests.get(volume.url + BLOB, timeout=5)
    assert got.status_code == 200
    assert got.content == body
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert (volume.root / BLOB.lstrip("/")).read_bytes() == body


def test_head_reports_length_without_body(volume: NginxVolume) -> None:
    requests.put(volume.url + BLOB, data=b"x" * 1234, timeout=5).raise_for_status()
    resp = requests.head(volume.url + BLOB, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Length"] == "1234"
    assert resp.content == b""


def test_large_put_is_not_limited(volume: NginxVolume) -> None:
    body = os.urandom(20 * MiB)
    resp = requests.put(volume.url + BLOB, data=body, timeout=30)
    assert resp.status_code == 201
    got = requests.get(volume.url + BLOB, timeout=30)
    assert hashlib.md5(got.content).digest() == hashlib.md5(body).digest()


def test_put_spools_on_the_data_filesystem(volume: NginxVolume) -> None:
    """The upload is renamed from root/.tmp into place, so it must share root's filesystem."""
    spool = volume.root / mkv_nginx.SPOOL_DIRNAME
    assert spool.is_dir()
    assert spool.stat().st_dev == volume.root.stat().st_dev
    requests.put(volume.url + BLOB, data=b"abc", timeout=5).raise_for_status()
    assert list(spool.iterdir()) == []


def test_put_overwrites_existing_blob_with_204(volume: NginxVolume) -> None:
    assert requests.put(volume.url + BLOB, data=b"first", timeout=5).status_code == 201
    resp = requests.put(volume.url + BLOB, data=b"second!", timeout=5)
    assert resp.status_code == 204
    assert "Location" not in resp.headers
    assert requests.get(volume.url + BLOB, timeout=5).content == b"second!"


def test_autoindex_lists_directories_and_files(volume: NginxVolume) -> None:
    requests.put(volume.url + BLOB, data=b"12345", timeout=5).raise_for_status()
    requests.put(volume.url + BLOB + ".key", data=b'{"key": "some key"}\n', timeout=5)

    top = listing(volume, f"/{KEY_HASH[:2]}/")
    assert set(top) == {KEY_HASH[2:4]}
    assert top[KEY_HASH[2:4]]["type"] == "directory"
    assert "size" not in top[KEY_HASH[2:4]]

    leaf = listing(volume, f"/{KEY_HASH[:2]}/{KEY_HASH[2:4]}/")
    assert set(leaf) == {KEY_HASH, KEY_HASH + ".key"}
    assert leaf[KEY_HASH]["type"] == "file"
    assert leaf[KEY_HASH]["size"] == 5
    assert isinstance(leaf[KEY_HASH]["mtime"], str)  # RFC 1123 date, e.g. "Sun, 29 Nov 2026 ..."


def test_root_listing_hides_runtime_directories(volume: NginxVolume) -> None:
    requests.put(volume.url + BLOB, data=b"x", timeout=5).raise_for_status()
    assert set(listing(volume, "/")) == {KEY_HASH[:2]}
    # .tmp (spool) and .nginx (config, pid) exist but are neither listed nor reachable.
    assert requests.get(volume.url + "/.nginx/nginx.conf", timeout=5).status_code == 404
    assert requests.put(volume.url + "/.tmp/x", data=b"x", timeout=5).status_code == 404


def test_directory_without_slash_redirects_relatively(volume: NginxVolume) -> None:
    requests.put(volume.url + BLOB, data=b"x", timeout=5).raise_for_status()
    resp = requests.get(f"{volume.url}/{KEY_HASH[:2]}", allow_redirects=False, timeout=5)
    assert resp.status_code == 301
    assert resp.headers["Location"] == f"/{KEY_HASH[:2]}/"


def test_listing_a_missing_directory_is_404(volume: NginxVolume) -> None:
    assert requests.get(volume.url + "/ff/", timeout=5).status_code == 404


def test_delete_removes_blob_and_second_delete_is_404(volume: NginxVolume) -> None:
    requests.put(volume.url + BLOB, data=b"x", timeout=5).raise_for_status()
    first = requests.delete(volume.url + BLOB, timeout=5)
    assert first.status_code == 204
    assert not (volume.root / BLOB.lstrip("/")).exists()
    assert requests.get(volume.url + BLOB, timeout=5).status_code == 404
    assert requests.delete(volume.url + BLOB, timeout=5).status_code == 404


def test_delete_of_a_directory_is_refused(volume: NginxVolume) -> None:
    """nginx would delete a whole subtree for DELETE /ab/; the template forbids it."""
    requests.put(volume.url + BLOB, data=b"x", timeout=5).raise_for_status()
    assert requests.delete(f"{volume.url}/{KEY_HASH[:2]}/", timeout=5).status_code == 405
    assert requests.delete(f"{volume.url}/{KEY_HASH[:2]}", timeout=5).status_code == 409
    assert requests.get(volume.url + BLOB, timeout=5).content == b"x"


def test_ping(volume: NginxVolume) -> None:
    resp = requests.get(volume.url + "/-/ping", timeout=5)
    assert (resp.status_code, resp.text) == (200, "ok\n")


def test_sigterm_stops_nginx_and_leaves_no_process(volume: NginxVolume) -> None:
    pgid = volume.proc.pid
    assert group_alive(pgid)
    started = time.monotonic()
    volume.proc.send_signal(signal.SIGTERM)
    volume.proc.wait(timeout=5)
    deadline = time.monotonic() + 5
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not group_alive(pgid)
    assert time.monotonic() - started < 5
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", volume.port), timeout=1).close()


def test_run_volume_execs_nginx_so_signals_reach_it(tmp_path: Path) -> None:
    """`mkv volume` must be nginx itself (same pid), not a Python parent that swallows SIGTERM."""
    port = free_port()
    code = (
        "import sys; from pathlib import Path; from mkv.volumes.nginx import run_volume; "
        "run_volume(Path(sys.argv[1]), int(sys.argv[2]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "data"), str(port)],
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ping", timeout=10)
        assert Path(f"/proc/{proc.pid}/exe").resolve().name == "nginx"
        assert (tmp_path / "data" / ".nginx" / "nginx.pid").read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def test_kill_and_restart_keep_the_data(volume: NginxVolume) -> None:
    requests.put(volume.url + BLOB, data=b"durable", timeout=5).raise_for_status()
    volume.kill()
    assert not group_alive(volume.proc.pid)
    with pytest.raises(requests.ConnectionError):
        requests.get(volume.url + BLOB, timeout=1)
    volume.restart()
    assert requests.get(volume.url + BLOB, timeout=5).content == b"durable"


def test_start_on_a_taken_port_reports_nginx_stderr(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(VolumeStartError, match="Address already in use"):
            NginxVolume.start(tmp_path / "data", port)


def test_three_volumes_are_independent(volumes: list[NginxVolume]) -> None:
    assert len({v.port for v in volumes}) == 3
    assert len({v.root for v in volumes}) == 3
    requests.put(volumes[0].url + BLOB, data=b"x", timeout=5).raise_for_status()
    assert requests.get(volumes[1].url + BLOB, timeout=5).status_code == 404


# --- rendering and the `mkv volume` entry point, without running nginx ----------------------


def placeholders(text: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+)\}", text))


@pytest.mark.parametrize("name, expected", [
    (mkv_nginx.SERVER_TEMPLATE, mkv_nginx.SERVER_PLACEHOLDERS),
    (mkv_nginx.DISK_TEMPLATE, mkv_nginx.DISK_PLACEHOLDERS)])
def test_templates_only_use_their_shared_placeholders(name: str, expected: frozenset) -> None:
    """The docker image renders the same files with envsubst; nothing else may look like one."""
    text = (mkv_nginx.templates_dir() / name).read_text()
    assert placeholders(text) == expected
    # nginx's own variables are lower-case: envsubst only touches the environment's names,
    # which in the stock image are upper-case
    assert all(name == name.lower() for name in re.findall(r"\$(\w+)", text))
    # renderers substitute comments too: a value with a newline would end the comment
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert not placeholders("\n".join(comments))


def render_and_test(tmp_path: Path, disks: Path | list[mkv_nginx.Disk], listen: str = "127.0.0.1:3001",
                    **kw: object) -> Path:
    """Render into tmp_path/work and run `nginx -t` on it; the work directory."""
    workdir = tmp_path / "work"
    conf = mkv_nginx.render_volume(disks, listen, workdir, **kw)
    assert "${" not in "".join(p.read_text() for p in workdir.glob("*.conf"))
    argv = mkv_nginx.volume_command(conf, workdir)
    check = subprocess.run([*argv, "-t"], check=False, capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr
    return workdir


SECRET = "0123456789abcdef-SECRET"


@pytest.mark.parametrize("disks", ["root", "disks"])
@pytest.mark.parametrize("writers", [None, "127.0.0.1,10.0.0.0/8,192.168.7.0/24,::1,fd00::/8"])
@pytest.mark.parametrize("secret", ["", SECRET])
def test_every_rendered_config_passes_nginx_t(tmp_path: Path, disks: str, writers: str | None,
                                              secret: str) -> None:
    spec = (tmp_path / "data dir" if disks == "root" else
            [mkv_nginx.Disk("/disk1", tmp_path / "d1"), mkv_nginx.Disk("/disk2", tmp_path / "d2")])
    nets = mkv_nginx.parse_writers(writers) if writers else None
    workdir = render_and_test(tmp_path, spec, writers=nets, secret=secret)
    server = (workdir / "volume.conf").read_text()
    if writers:
        assert "    10.0.0.0/8 1;\n    192.168.7.0/24 1;\n    ::1/128 1;\n    fd00::/8 1;\n" in server
    else:
        assert "    127.0.0.0/8 1;\n    ::1/128 1;\n}" in server
    assert (f'secure_link_md5 "$secure_link_expires$uri$mkv_hops_127_0_0_1_3001 {secret}";'
            in server)
    assert f'map "{secret}" $mkv_signed_127_0_0_1_3001 {{' in server


def test_render_volume_writes_a_config_nginx_accepts(tmp_path: Path) -> None:
    root = tmp_path / "data dir"
    workdir = render_and_test(tmp_path, root, mkv_nginx.listen_address("::1", 3001))
    assert (root / ".tmp").is_dir()
    server = (workdir / "volume.conf").read_text()
    assert "listen [::1]:3001;" in server
    assert f'access_log "{workdir / "access.log"}" "mkv_volume_[::1]:3001"' in server
    assert f'include "{workdir / "disks.conf"}";' in server
    disk = (workdir / "disks.conf").read_text()
    assert "location ^~ / {" in disk
    assert f'alias "{root}/";' in disk
    assert f'client_body_temp_path "{root}/.tmp";' in disk


def test_rendered_files_are_private_even_over_older_ones(tmp_path: Path) -> None:
    """They hold the redirect secret: owner only, also when an earlier rendering was 0644."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "volume.conf").write_text("old")
    (workdir / "volume.conf").chmod(0o644)
    mkv_nginx.render_volume(tmp_path / "data", "127.0.0.1:3001", workdir, secret=SECRET)
    for name in ("nginx.conf", "volume.conf", "disks.conf"):
        assert (workdir / name).stat().st_mode & 0o777 == 0o600, name
    assert SECRET in (workdir / "volume.conf").read_text()
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".")] == []


def test_workers_follow_the_machine(tmp_path: Path) -> None:
    import resource
    workdir = render_and_test(tmp_path, tmp_path / "data")
    main = (workdir / "nginx.conf").read_text()
    nofile, connections = mkv_nginx.worker_limits(*resource.getrlimit(resource.RLIMIT_NOFILE))
    assert "worker_processes auto;" in main
    assert f"worker_rlimit_nofile {nofile};" in main
    assert f"worker_connections {connections};" in main


@pytest.mark.parametrize("soft, hard, expected", [
    (1024, 524288, (32768, 16384)),   # Debian's default: the hard limit is what nginx can use
    (65536, 65536, (32768, 16384)),   # systemd's LimitNOFILE=65536: capped
    (1024, 4096, (4096, 2048)),
    (20000, 20000, (20000, 10000)),
    (64, 64, (64, 256)),              # tiny: nginx warns, but a volume needs some connections
    (-1, -1, (32768, 16384)),         # RLIM_INFINITY
])
def test_worker_limits(soft: int, hard: int, expected: tuple[int, int]) -> None:
    assert mkv_nginx.worker_limits(soft, hard) == expected


def test_two_volumes_in_one_nginx_do_not_clash(tmp_path: Path) -> None:
    """log_format, geo and map are http-wide: each volume's server block names its own after
    its listen address, so one nginx can serve several volumes' blocks (a host's conf.d)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    source = mkv_nginx.templates_dir()
    template = (source / mkv_nginx.SERVER_TEMPLATE).read_text()
    texts = []
    for i, port in enumerate((3001, 3002)):
        root = tmp_path / f"data{i}"
        (root / ".tmp").mkdir(parents=True)
        disks = workdir / f"disk{i}.locations"
        disks.write_text(mkv_nginx.render_disk_block(
            (source / mkv_nginx.DISK_TEMPLATE).read_text(), mkv_nginx.Disk("", root)))
        texts.append(mkv_nginx.render_server_block(
            template, listen=mkv_nginx.listen_address("127.0.0.1", port),
            access_log=workdir / f"{i}.log", disks_conf=disks,
            writers=mkv_nginx.parse_writers("127.0.0.1"), secret=SECRET if i else ""))
        (workdir / f"volume{i}.server").write_text(texts[-1])
    variables = [set(re.findall(r"\$(mkv_\w+)", text)) for text in texts]
    assert len(variables[0]) == 6 and not variables[0] & variables[1]
    main = workdir / "nginx.conf"
    main.write_text(mkv_nginx.render_main_config(
        (source / mkv_nginx.MAIN_TEMPLATE).read_text(), workdir=workdir,
        server_conf=workdir / "*.server", user_line="", worker_processes=1,
        error_log_level="warn"))
    argv = mkv_nginx.volume_command(main, workdir)
    check = subprocess.run([*argv, "-t"], check=False, capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("text, error", [
    ("", "none given"), (" , ", "none given"), ("10.0.0.5/8", "host bits set"),
    ("localhost", "does not appear to be an IPv4 or IPv6 network"), ("::1/129", "::1/129")])
def test_parse_writers_refuses(text: str, error: str) -> None:
    with pytest.raises(mkv_nginx.VolumeConfigError, match=error):
        mkv_nginx.parse_writers(text)


def test_parse_writers_takes_addresses_and_networks() -> None:
    nets = mkv_nginx.parse_writers(" 10.0.0.5, 10.1.0.0/16,::1,10.0.0.5 ")
    assert [n.with_prefixlen for n in nets] == ["10.0.0.5/32", "10.1.0.0/16", "::1/128"]
    assert mkv_nginx.geo_entries(nets) == "10.0.0.5/32 1;\n    10.1.0.0/16 1;\n    ::1/128 1;"


@pytest.mark.parametrize("text, error", [
    ("disk1", "NAME=DIR"), ("disk1=", "NAME=DIR"), ("=/srv/d", "the name"),
    (".tmp=/srv/d", "the name"), ("-=/srv/d", "the name"), ("a/b=/srv/d", "the name"),
    ('d="/srv/x"', "characters nginx config cannot hold"), ("d=/srv/$x", "cannot hold")])
def test_parse_disk_refuses(text: str, error: str) -> None:
    with pytest.raises(mkv_nginx.VolumeConfigError, match=error):
        mkv_nginx.parse_disk(text)


def test_parse_disk() -> None:
    assert mkv_nginx.parse_disk("disk-1.a_b=/srv/d=1") == mkv_nginx.Disk("/disk-1.a_b",
                                                                         Path("/srv/d=1"))


@pytest.mark.parametrize("disks, error", [
    ([], "no disk"),
    (["a=/srv/a", "a=/srv/b"], "given twice"),
    (["a=/srv/a", "b=/srv/a"], "overlap"),
    (["a=/srv", "b=/srv/b"], "overlap")])
def test_check_disks_refuses(disks: list[str], error: str) -> None:
    with pytest.raises(mkv_nginx.VolumeConfigError, match=error):
        mkv_nginx.check_disks([mkv_nginx.parse_disk(d) for d in disks])


def test_the_debian_runbook_renders_a_working_site(tmp_path: Path) -> None:
    """docs/runbooks.md, "Volumes on a plain Debian nginx": its commands, run with the
    paths moved under tmp_path, make a site that nginx accepts and that serves three disks
    to the writers it names."""
    text = (REPO / "docs" / "runbooks.md").read_text()
    section = text.split("\n## Volumes on a plain Debian nginx\n", 1)[1].split("\n## ", 1)[0]
    [script] = re.findall(r"```sh\n(.*?)```", section, re.S)
    port = free_port()
    etc, srv, log = tmp_path / "etc" / "nginx", tmp_path / "srv", tmp_path / "log"
    for path in (etc / "sites-available", etc / "sites-enabled", log,
                 *(srv / f"disk{i}" for i in (1, 2, 3))):
        path.mkdir(parents=True)
    for old, new in (("/opt/mkv/share/mkv/nginx", str(mkv_nginx.templates_dir())),
                     ("/etc/nginx", str(etc)), ("/srv/", f"{srv}/"), ("/var/log/nginx", str(log)),
                     ("PORT=3001", f"PORT={port}"), ("nginx -t && systemctl reload nginx", "")):
        assert old in script, old
        script = script.replace(old, new)
    subprocess.run(["bash", "-euc", textwrap.dedent(script)], check=True, timeout=30)
    site = etc / "sites-available" / f"mkv-{port}"
    assert site.stat().st_mode & 0o777 == 0o600
    main = tmp_path / "nginx.conf"  # Debian's, reduced to what matters here
    main.write_text(f"""{mkv_nginx.user_line(srv)}
daemon off; pid "{tmp_path}/nginx.pid"; error_log stderr warn; worker_processes 1;
events {{ }}
http {{
    client_body_temp_path "{tmp_path}/body"; proxy_temp_path "{tmp_path}/proxy";
    fastcgi_temp_path "{tmp_path}/fastcgi"; uwsgi_temp_path "{tmp_path}/uwsgi";
    scgi_temp_path "{tmp_path}/scgi";
    include "{etc}/sites-enabled/*";
}}
""")
    argv = mkv_nginx.volume_command(main, tmp_path)
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(argv, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/-/ping")
        assert requests.put(url + "/disk2" + BLOB, data=b"x", timeout=5).status_code == 201
        assert (srv / "disk2" / BLOB.lstrip("/")).read_bytes() == b"x"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                          source_address=("127.0.0.2", 0))
        conn.request("PUT", "/disk1" + BLOB, body=b"y")
        assert conn.getresponse().status == 403  # 127.0.0.2 is not in WRITERS
        conn.close()
        assert requests.get(url + "/disk3/-/ping", timeout=5).text == "ok\n"
        assert requests.get(url + "/disk2/", timeout=5).json()[0]["name"] == BLOB[1:3]
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for_access_lines(volume: NginxVolume, path: str, n: int) -> list[str]:
    """nginx flushes its buffered access log within a second: wait for n lines about path."""
    deadline = time.monotonic() + 10
    while len(lines := [line for line in volume.access_lines() if f" {path} " in line]) < n:
        assert time.monotonic() < deadline, f"{n} access lines expected: {volume.access_lines()}"
        time.sleep(0.05)
    return lines


def test_access_log_carries_the_request_id(volume: NginxVolume) -> None:
    requests.put(volume.url + BLOB, data=b"12345", headers={"X-Request-Id": "rid-1.a:b"},
                 timeout=5).raise_for_status()
    requests.head(volume.url + BLOB, timeout=5).raise_for_status()
    # what a direct client sends is escaped: a quote cannot end the request field early
    requests.get(volume.url + BLOB, headers={"X-Request-Id": 'x"y'}, timeout=5)
    # each nginx worker flushes its own buffer: the lines need not be in request order
    lines = {line.split('"')[1].split()[0]: line for line in wait_for_access_lines(volume, BLOB, 3)}
    assert f'"PUT {BLOB} HTTP/1.1" 201 ' in lines["PUT"]
    assert lines["PUT"].endswith(" rid=rid-1.a:b")
    assert lines["HEAD"].endswith(" rid=-")  # none sent
    assert lines["GET"].endswith(r" rid=x\x22y")
    assert not [line for line in volume.access_lines() if "/-/ping" in line]  # probes: no lines


def test_user_line_only_as_root(tmp_path: Path) -> None:
    line = mkv_nginx.user_line(tmp_path)
    assert (line != "") == (os.geteuid() == 0)


def parse_volume_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mkv volume")
    mkv_nginx.add_volume_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_volume_main_rejects_bad_port(
    tmp_path: Path, port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse_volume_args(["--root", str(tmp_path), "--port", port])
    assert mkv_nginx.volume_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "port" in err


def test_volume_main_rejects_a_file_as_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "file"
    afile.write_text("")
    args = parse_volume_args(["--root", str(afile), "--port", str(free_port())])
    assert mkv_nginx.volume_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory" in err


@pytest.mark.parametrize("argv, error", [
    ([], "no disk: give --root DIR, or --disk NAME=DIR"),
    (["--root", "{tmp}/r", "--disk", "a={tmp}/a"], "--root and --disk exclude each other"),
    (["--disk", "a={tmp}/a", "--disk", "a={tmp}/b"], "given twice"),
    (["--disk", "../x={tmp}/a"], "the name"),
    (["--root", "{tmp}/r", "--writers", "10.0.0.1/8"], "writers: 10.0.0.1/8 has host bits set"),
    (["--root", "{tmp}/r", "--writers", ""], "writers: none given"),
    (["--root", "{tmp}/r", "--redirect-secret", "short"], "redirect-secret: must be 16 to 256"),
    (["--root", "{tmp}/r", "--redirect-secret", 'x"; return 200; #' * 2], "redirect-secret"),
])
def test_volume_main_refuses_bad_disks_writers_and_secrets(
    tmp_path: Path, argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse_volume_args([a.replace("{tmp}", str(tmp_path)) for a in argv]
                             + ["--port", str(free_port())])
    assert mkv_nginx.volume_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err, err
    assert not list(tmp_path.iterdir()), "nothing is created for a refused configuration"


def test_volume_main_rejects_a_file_as_a_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "file"
    afile.write_text("")
    args = parse_volume_args(["--disk", f"d1={tmp_path / 'ok'}", "--disk", f"d2={afile}",
                              "--port", str(free_port())])
    assert mkv_nginx.volume_main(args) == 2
    assert "--disk d2 is not a directory" in capsys.readouterr().err


def test_find_nginx_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mkv_nginx.shutil, "which", lambda name: None)
    monkeypatch.setattr(mkv_nginx.Path, "is_file", lambda self: False)
    with pytest.raises(mkv_nginx.NginxNotFound, match="apt-get install nginx-light"):
        mkv_nginx.find_nginx()

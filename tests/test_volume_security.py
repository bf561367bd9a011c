"""Who may do what on a volume, against real nginx: the writers (`--writers`: PUT, DELETE
and listings), signed reads (`redirect-secret`), several disks behind one nginx, and a
real `mkv serve` and mkv-rebuild working through them.

A client outside the writers is a socket bound to 127.0.0.2: on Linux every 127/8 address
is this host's, and it reaches a volume listening on 127.0.0.1. The volumes here list
127.0.0.1 alone as writer, since the default (all of loopback) would include 127.0.0.2.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from mkv.signing import redirect_query, signature
from mkv.volumes import nginx as mkv_nginx
from mkv.volumes.nginx import Disk, parse_writers
from tests.cluster import NginxVolume, free_port, wait_http
from tests.helpers import REPO, TIMEOUT, blob_rel, body_for, read, replicas_of, rows, run_cli

OUTSIDER = "127.0.0.2"
ONLY_LOCALHOST = parse_writers("127.0.0.1")
SECRET = "s3cret-0123456789.abc_DEF~+/="
BLOB = blob_rel("a key")  # /ab/cd/<hash>
MiB = 1 << 20


def call(port: int, method: str, path: str, body: bytes | None = None,
         source: str = "127.0.0.1", host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request from `source`, path sent as is; (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT, source_address=(source, 0))
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def files_under(root: Path) -> list[Path]:
    """Everything on a disk but nginx's own directories (work directory, empty spool)."""
    return sorted(p for p in root.rglob("*") if mkv_nginx.WORKDIR_NAME not in p.parts
                  and p != root / mkv_nginx.SPOOL_DIRNAME)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., NginxVolume]]:
    """Factory: start(name, **NginxVolume.start options); stopped when the test ends."""
    started: list[NginxVolume] = []

    def make(name: str = "vol", **kw: object) -> NginxVolume:
        started.append(NginxVolume.start(tmp_path / name, **kw))  # type: ignore[arg-type]
        return started[-1]

    yield make
    for volume in started:
        volume.stop()


# --- writers: PUT, DELETE and listings only from them -------------------------------------------


def test_put_from_outside_the_writers_is_refused_and_writes_nothing(start) -> None:
    vol = start(writers=ONLY_LOCALHOST)
    assert call(vol.port, "PUT", BLOB, b"intruder", source=OUTSIDER)[0] == 403
    assert files_under(vol.root) == []
    assert list((vol.root / ".tmp").iterdir()) == []
    assert call(vol.port, "PUT", BLOB, b"mkv's", source="127.0.0.1")[0] == 201
    assert (vol.root / BLOB.lstrip("/")).read_bytes() == b"mkv's"
    # an overwrite is refused just the same, and leaves the blob as it was
    assert call(vol.port, "PUT", BLOB, b"intruder", source=OUTSIDER)[0] == 403
    assert (vol.root / BLOB.lstrip("/")).read_bytes() == b"mkv's"


def test_a_refused_put_is_answered_before_its_body_is_read(start) -> None:
    """The verdict comes before any location: nginx answers 403 on the headers alone, and
    never spools the megabytes announced."""
    vol = start(writers=ONLY_LOCALHOST)
    with socket.create_connection(("127.0.0.1", vol.port), timeout=TIMEOUT,
                                  source_address=(OUTSIDER, 0)) as sock:
        sock.sendall(f"PUT {BLOB} HTTP/1.1\r\nHost: v\r\nContent-Length: {64 * MiB}\r\n\r\n"
                     .encode() + b"x" * 1024)
        assert sock.recv(4096).startswith(b"HTTP/1.1 403 ")
    assert list((vol.root / ".tmp").iterdir()) == []
    assert files_under(vol.root) == []


def test_delete_from_outside_the_writers_is_refused_and_keeps_the_blob(start) -> None:
    vol = start(writers=ONLY_LOCALHOST)
    assert call(vol.port, "PUT", BLOB, b"kept")[0] == 201
    assert call(vol.port, "DELETE", BLOB, source=OUTSIDER)[0] == 403
    assert (vol.root / BLOB.lstrip("/")).read_bytes() == b"kept"
    assert call(vol.port, "DELETE", BLOB, source="127.0.0.1")[0] == 204
    assert not (vol.root / BLOB.lstrip("/")).exists()


def test_reads_of_blobs_are_open_without_a_secret(start) -> None:
    vol = start(writers=ONLY_LOCALHOST)
    assert call(vol.port, "PUT", BLOB, b"public bytes")[0] == 201
    assert call(vol.port, "GET", BLOB, source=OUTSIDER) == (200, b"public bytes")
    assert call(vol.port, "HEAD", BLOB, source=OUTSIDER) == (200, b"")
    assert call(vol.port, "GET", BLOB + "x", source=OUTSIDER)[0] == 404


def test_listings_are_for_writers_only(start) -> None:
    vol = start(writers=ONLY_LOCALHOST)
    assert call(vol.port, "PUT", BLOB, b"x")[0] == 201
    top = BLOB[:4]  # "/ab/"
    for path in ("/", top, BLOB[:7]):
        assert call(vol.port, "GET", path, source=OUTSIDER)[0] == 403, path
        assert call(vol.port, "HEAD", path, source=OUTSIDER)[0] == 403, path
    status, body = call(vol.port, "GET", top)
    assert status == 200
    assert [e["name"] for e in json.loads(body)] == [BLOB[4:6]]


@pytest.mark.parametrize("method, status", [
    *[(m, 403) for m in ("POST", "OPTIONS", "MKCOL", "PROPFIND", "COPY", "MOVE", "PATCH")],
    ("TRACE", 405)])  # nginx's core refuses TRACE to everyone, before any of the config
def test_other_methods_from_outside_the_writers_are_refused(start, method: str, status: int
                                                            ) -> None:
    vol = start(writers=ONLY_LOCALHOST)
    assert call(vol.port, "PUT", BLOB, b"x")[0] == 201
    assert call(vol.port, method, BLOB, source=OUTSIDER)[0] == status
    assert (vol.root / BLOB.lstrip("/")).read_bytes() == b"x"


def test_ping_is_open_to_everyone(start) -> None:
    vol = start(writers=ONLY_LOCALHOST, secret=SECRET)
    assert call(vol.port, "GET", "/-/ping", source=OUTSIDER) == (200, b"ok\n")


def test_the_default_writers_are_all_of_loopback(start) -> None:
    vol = start()
    assert call(vol.port, "PUT", BLOB, b"x", source=OUTSIDER)[0] == 201
    assert call(vol.port, "GET", "/", source=OUTSIDER)[0] == 200


def test_writers_are_per_volume_in_one_nginx(tmp_path: Path) -> None:
    """Two volumes' server blocks in one nginx, with different writers: each keeps its own
    (geo and map are http-wide; their names carry the listen address)."""
    source = mkv_nginx.templates_dir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    ports = [free_port(), free_port()]
    for i, (port, writers) in enumerate(zip(ports, ("127.0.0.1", "127.0.0.0/8"), strict=True)):
        root = tmp_path / f"data{i}"
        (root / ".tmp").mkdir(parents=True)
        disks = workdir / f"disk{i}.locations"
        disks.write_text(mkv_nginx.render_disk_block(
            (source / mkv_nginx.DISK_TEMPLATE).read_text(), Disk("", root)))
        (workdir / f"volume{i}.server").write_text(mkv_nginx.render_server_block(
            (source / mkv_nginx.SERVER_TEMPLATE).read_text(),
            listen=mkv_nginx.listen_address("127.0.0.1", port), access_log=workdir / f"{i}.log",
            disks_conf=disks, writers=parse_writers(writers)))
    main = workdir / "nginx.conf"
    main.write_text(mkv_nginx.render_main_config(
        (source / mkv_nginx.MAIN_TEMPLATE).read_text(), workdir=workdir,
        server_conf=workdir / "*.server", user_line=mkv_nginx.user_line(tmp_path),
        worker_processes=1, error_log_level="warn"))
    proc = subprocess.Popen(mkv_nginx.volume_command(main, workdir), start_new_session=True,
                            stderr=subprocess.DEVNULL)
    try:
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/-/ping")
        assert call(ports[0], "PUT", BLOB, b"x", source=OUTSIDER)[0] == 403
        assert call(ports[1], "PUT", BLOB, b"x", source=OUTSIDER)[0] == 201
    finally:
        proc.terminate()
        proc.wait(10)


# --- signed reads -------------------------------------------------------------------------------


def sign(path: str, expires: int, secret: str = SECRET) -> str:
    return f"?md5={signature(path, expires, secret)}&expires={expires}"


def other_first_char(text: str) -> str:
    """The same text with its first character changed: it carries 6 whole bits of the MD5
    (the last base64 character has unused ones, which a decoder may ignore)."""
    return ("B" if text[0] == "A" else "A") + text[1:]


def test_a_fresh_signature_serves_the_bytes(start) -> None:
    vol = start(writers=ONLY_LOCALHOST, secret=SECRET)
    body = os.urandom(5000)
    assert call(vol.port, "PUT", BLOB, body)[0] == 201
    query = redirect_query(BLOB, (), time.time(), 60, SECRET)
    assert call(vol.port, "GET", BLOB + query, source=OUTSIDER) == (200, body)
    assert call(vol.port, "HEAD", BLOB + query, source=OUTSIDER) == (200, b"")


def _bad_queries() -> dict[str, Callable[[str, int], str]]:
    def md5_changed(path: str, expires: int) -> str:
        return f"?md5={other_first_char(signature(path, expires, SECRET))}&expires={expires}"

    return {
        "unsigned": lambda path, expires: "",
        "one character of the signature changed": md5_changed,
        "the expiry changed": lambda path, expires: sign(path, expires)[:-len(str(expires))]
        + str(expires + 1),
        "expired": lambda path, expires: sign(path, int(time.time()) - 60),
        "signed for another path": lambda path, expires: sign(path + ".key", expires),
        "signed with another secret": lambda path, expires: sign(path, expires, "x" * 16),
        "no expiry": lambda path, expires: f"?md5={signature(path, expires, SECRET)}",
        "no signature": lambda path, expires: f"?expires={expires}",
        "a signature that is not base64": lambda path, expires: f"?md5=%25%25&expires={expires}",
    }


@pytest.mark.parametrize("how", list(_bad_queries()))
def test_unsigned_tampered_or_expired_reads_get_403(start, how: str) -> None:
    vol = start(writers=ONLY_LOCALHOST, secret=SECRET)
    assert call(vol.port, "PUT", BLOB, b"secret bytes")[0] == 201
    query = _bad_queries()[how](BLOB, int(time.time()) + 60)
    assert call(vol.port, "GET", BLOB + query, source=OUTSIDER)[0] == 403
    assert call(vol.port, "HEAD", BLOB + query, source=OUTSIDER)[0] == 403


def test_writers_read_and_write_without_a_signature(start) -> None:
    """mkv's own requests (health, rebuild, rebalance, the fan-out) carry no signature."""
    vol = start(writers=ONLY_LOCALHOST, secret=SECRET)
    assert call(vol.port, "PUT", BLOB, b"mine")[0] == 201
    assert call(vol.port, "GET", BLOB) == (200, b"mine")
    assert call(vol.port, "GET", BLOB[:4])[0] == 200
    assert call(vol.port, "DELETE", BLOB)[0] == 204


def test_a_signature_opens_reads_only(start) -> None:
    vol = start(writers=ONLY_LOCALHOST, secret=SECRET)
    assert call(vol.port, "PUT", BLOB, b"x")[0] == 201
    expires = int(time.time()) + 60
    assert call(vol.port, "PUT", BLOB + sign(BLOB, expires), b"y", source=OUTSIDER)[0] == 403
    assert call(vol.port, "DELETE", BLOB + sign(BLOB, expires), source=OUTSIDER)[0] == 403
    assert call(vol.port, "GET", BLOB[:4] + sign(BLOB[:4], expires), source=OUTSIDER)[0] == 403
    assert (vol.root / BLOB.lstrip("/")).read_bytes() == b"x"


# --- several disks behind one nginx -------------------------------------------------------------


def three_disks(tmp_path: Path) -> list[Disk]:
    return [Disk(f"/disk{i}", tmp_path / f"mnt{i}" / "data") for i in (1, 2, 3)]


def configured_disks(vol: NginxVolume) -> dict[str, tuple[str, str]]:
    """What the rendered config says: location prefix -> (alias, client_body_temp_path)."""
    text = (vol.workdir / mkv_nginx.DISKS_CONF).read_text()
    found = re.findall(r'location \^~ (\S*)/ \{\s+alias "([^"]+)/";.*?client_body_temp_path '
                       r'"([^"]+)";', text, re.S)
    return {prefix: (alias, spool) for prefix, alias, spool in found}


def test_each_disk_takes_its_own_blobs_and_spools_on_itself(start, tmp_path: Path) -> None:
    disks = three_disks(tmp_path)
    vol = start("host", disks=disks)
    assert configured_disks(vol) == {
        d.prefix: (str(d.root), str(d.root / ".tmp")) for d in disks}
    for d in disks:
        spool = d.root / ".tmp"
        assert spool.is_dir() and spool.stat().st_dev == d.root.stat().st_dev
    assert call(vol.port, "PUT", "/disk1" + BLOB, b"one")[0] == 201
    assert call(vol.port, "PUT", "/disk2" + BLOB, b"two")[0] == 201
    assert (disks[0].root / BLOB.lstrip("/")).read_bytes() == b"one"
    assert (disks[1].root / BLOB.lstrip("/")).read_bytes() == b"two"
    assert files_under(disks[2].root) == []
    assert call(vol.port, "GET", "/disk2" + BLOB) == (200, b"two")
    assert call(vol.port, "DELETE", "/disk1" + BLOB)[0] == 204
    assert (disks[1].root / BLOB.lstrip("/")).exists()


def test_an_upload_is_spooled_on_the_disk_it_goes_to(start, tmp_path: Path) -> None:
    """Caught mid-upload: the body sits in that disk's .tmp, nowhere else, so the rename
    into place stays on one filesystem."""
    disks = three_disks(tmp_path)
    vol = start("host", disks=disks)
    body = os.urandom(2 * MiB)
    with socket.create_connection(("127.0.0.1", vol.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"PUT /disk2{BLOB} HTTP/1.1\r\nHost: v\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body[:MiB])
        deadline = time.monotonic() + TIMEOUT
        while not list((disks[1].root / ".tmp").iterdir()):
            assert time.monotonic() < deadline, "the upload never reached disk2's spool"
            time.sleep(0.02)
        assert list((disks[0].root / ".tmp").iterdir()) == []
        assert list((disks[2].root / ".tmp").iterdir()) == []
        assert not [p for p in vol.workdir.rglob("*") if p.is_file() and "client_body" in p.parts]
        sock.sendall(body[MiB:])
        assert sock.recv(4096).startswith(b"HTTP/1.1 201 ")
    assert (disks[1].root / BLOB.lstrip("/")).read_bytes() == body
    assert list((disks[1].root / ".tmp").iterdir()) == []


def test_each_disk_lists_its_own_tree(start, tmp_path: Path) -> None:
    disks = three_disks(tmp_path)
    vol = start("host", disks=disks)
    other = blob_rel("another key")
    assert call(vol.port, "PUT", "/disk1" + BLOB, b"1")[0] == 201
    assert call(vol.port, "PUT", "/disk2" + other, b"2")[0] == 201

    def names(path: str) -> list[str]:
        status, body = call(vol.port, "GET", path)
        assert status == 200, path
        return [e["name"] for e in json.loads(body)]

    assert names("/disk1/") == [BLOB[1:3]]  # .tmp (and the work directory) are hidden
    assert names("/disk2/") == [other[1:3]]
    assert names("/disk3/") == []
    assert names(f"/disk1{BLOB[:7]}") == [BLOB[7:]]
    assert call(vol.port, "GET", "/disk1/", source=OUTSIDER)[0] == 200  # all loopback writes
    # outside the disks there is nothing, for any method; the probes answer
    for method, path in (("GET", "/"), ("GET", BLOB), ("PUT", "/disk4" + BLOB),
                         ("GET", "/disk1"), ("GET", "/nodisk/-/ping")):
        assert call(vol.port, method, path, b"" if method == "PUT" else None)[0] == 404, path
    for path in ("/-/ping", "/disk1/-/ping", "/disk3/-/ping"):
        assert call(vol.port, "GET", path) == (200, b"ok\n"), path
    assert call(vol.port, "GET", "/disk1/.tmp/")[0] == 404
    assert call(vol.port, "DELETE", "/disk1" + BLOB[:4])[0] == 405


def test_signatures_cover_the_disk_prefix(start, tmp_path: Path) -> None:
    vol = start("host", disks=three_disks(tmp_path), writers=ONLY_LOCALHOST, secret=SECRET)
    assert call(vol.port, "PUT", "/disk2" + BLOB, b"bytes")[0] == 201
    expires = int(time.time()) + 60
    assert call(vol.port, "GET", "/disk2" + BLOB + sign("/disk2" + BLOB, expires),
                source=OUTSIDER) == (200, b"bytes")
    assert call(vol.port, "GET", "/disk2" + BLOB + sign(BLOB, expires), source=OUTSIDER)[0] == 403
    assert call(vol.port, "GET", "/disk2" + BLOB + sign("/disk1" + BLOB, expires),
                source=OUTSIDER)[0] == 403


def test_mkv_serves_and_rebuilds_through_several_disks(start, make_service, tmp_path: Path
                                                       ) -> None:
    """A real `mkv serve` over the volumes host:port/disk1..3 of one nginx (one failure
    domain, so replicas 1), then mkv-rebuild from them."""
    disks = three_disks(tmp_path)
    vol = start("host", disks=disks)
    svc = make_service(vol.disk_addresses, replicas=1)
    keys = [f"/multi/{i}" for i in range(24)]
    for key in keys:
        assert requests.put(svc.url + key, data=body_for(key), timeout=TIMEOUT).status_code == 201
    where = {}
    for key in keys:
        assert read(svc, key) == body_for(key)
        [where[key]] = replicas_of(svc, key)
        disk = disks[vol.disk_addresses.index(where[key])]
        assert any(disk.root.rglob(blob_rel(key).rsplit("/", 1)[1] + "*"))
    assert set(where.values()) == set(vol.disk_addresses), "24 keys, all on one disk?"

    rebuilt = tmp_path / "rebuilt.db"
    result = run_cli(vol.disk_addresses, rebuilt, replicas=1)
    assert result.returncode == 0, result.stderr
    found = rows(rebuilt)
    assert set(found) == set(keys)
    assert {key: row[1] for key, row in found.items()} == where
    assert {key: row[2] for key, row in found.items()} == {k: len(body_for(k)) for k in keys}


# --- `mkv volume` from the shared file ----------------------------------------------------------


class MkvVolume:
    """`mkv volume` as an operator runs it, in its own session; stopped on exit."""

    def __init__(self, argv: list[str], port: int, host: str = "127.0.0.1") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MKV_")} | {
            "MKV_CONFIG": ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "mkv", "volume", *argv], cwd=REPO,
                                     env=env, start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.output = b""
        try:
            wait_http(f"http://{host}:{port}/-/ping")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.proc.terminate()
        self.output = self.proc.communicate(timeout=10)[0]

    def __enter__(self) -> MkvVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_mkv_volume_takes_disks_writers_and_the_services_secret_from_the_shared_file(
        tmp_path: Path) -> None:
    port = free_port()
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    conf = tmp_path / "mkv.conf"
    conf.write_text("\n".join([
        "volumes = 127.0.0.1:1/d1", "port = 1", "bind = 10.9.9.9",  # the service's, ignored
        f"redirect-secret = {SECRET}",  # the service's, read by the volume too
        f"volume-disk = [d1={d1}, d2={d2}]", f"volume-port = {port}",
        "volume-writers = 127.0.0.1"]) + "\n")
    with MkvVolume(["--config", str(conf)], port) as volume:
        assert call(port, "PUT", "/d1" + BLOB, b"one")[0] == 201
        assert (d1 / BLOB.lstrip("/")).read_bytes() == b"one"
        assert call(port, "PUT", "/d2" + BLOB, b"two", source=OUTSIDER)[0] == 403
        assert call(port, "GET", "/d1" + BLOB, source=OUTSIDER)[0] == 403
        query = redirect_query("/d1" + BLOB, (), time.time(), 60, SECRET)
        assert call(port, "GET", "/d1" + BLOB + query, source=OUTSIDER) == (200, b"one")
        assert call(port, "GET", "/d1" + BLOB) == (200, b"one")
        rendered = d1 / mkv_nginx.WORKDIR_NAME / mkv_nginx.SERVER_CONF
        assert rendered.stat().st_mode & 0o777 == 0o600
    assert SECRET.encode() not in volume.output
    assert not (d2 / BLOB.lstrip("/")).exists()


def global_address(family: socket.AddressFamily) -> str:
    """One of this host's addresses that is not loopback, or skip: the default writers
    can only be tried against a source outside them."""
    try:
        out = subprocess.run(["ip", "-o", "-4" if family == socket.AF_INET else "-6", "addr",
                              "show", "scope", "global"], capture_output=True, text=True,
                             timeout=10).stdout
    except FileNotFoundError:
        pytest.skip("no `ip` command to find a non-loopback address")
    found = re.findall(r"inet6? ([0-9a-f.:]+)/", out)
    if not found:
        pytest.skip("this host has no non-loopback address to connect from")
    return found[0]


@pytest.mark.parametrize("family, bind, loopback", [
    (socket.AF_INET, "0.0.0.0", "127.0.0.1"), (socket.AF_INET6, "::", "::1")], ids=["v4", "v6"])
def test_by_default_only_loopback_writes(tmp_path: Path, family: socket.AddressFamily,
                                         bind: str, loopback: str) -> None:
    """mkv volume without --writers: this host's loopback (127.0.0.0/8, ::1) writes and
    lists, a client from another address (here the host's own, off loopback) only reads."""
    outside = global_address(family)
    port = free_port()
    with MkvVolume(["--root", str(tmp_path / "data"), "--port", str(port), "--bind", bind],
                   port, host=f"[{loopback}]" if ":" in loopback else loopback):
        assert call(port, "PUT", BLOB, b"x", source=loopback, host=loopback)[0] == 201
        assert call(port, "PUT", BLOB, b"y", source=outside, host=outside)[0] == 403
        assert call(port, "DELETE", BLOB, source=outside, host=outside)[0] == 403
        assert call(port, "GET", "/", source=outside, host=outside)[0] == 403
        assert call(port, "GET", BLOB, source=outside, host=outside) == (200, b"x")
        assert call(port, "GET", "/", source=loopback, host=loopback)[0] == 200

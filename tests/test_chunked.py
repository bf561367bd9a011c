"""PUT without a Content-Length (Transfer-Encoding: chunked), end to end: a real `mkv
serve` over real nginx volumes.

A chunked body is streamed to the replicas chunked too, its size and md5 counted on the
way; one that fits in one chunk takes the small path. What must hold whatever the body
does: a body over `max-value-bytes` is cut off mid-stream (413), a body cut off by its
client leaves nothing, and neither leaves a file on any volume (blob, sidecar or nginx
spool) or a record in the index. Those tests run on a cluster of their own that only
ever sees failed writes, so "nothing" is checked by walking the whole of each volume.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from mkv.identity import MARKER
from mkv.volumes.nginx import WORKDIR_NAME
from tests.cluster import NginxVolume
from tests.conftest import start_volumes
from tests.helpers import (
    TIMEOUT,
    assert_json_error,
    disk_files,
    health_locks,
    index_record,
    kurl,
    raw_exchange,
    read,
    spooled,
    wait_until,
)
from tests.service import MkvService
from tests.test_requestlog import access_line

MiB = 1 << 20
LIMIT = 3 * MiB


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def chunked(data: bytes, size: int) -> bytes:
    """`data` framed as a chunked body, `size` bytes a chunk, with its last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks_of(data, size)) + b"0\r\n\r\n"


def chunked_head(svc: MkvService, path: str, rid: str, extra: str = "") -> bytes:
    return (f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\nX-Request-Id: {rid}\r\n"
            f"Transfer-Encoding: chunked\r\n{extra}Connection: close\r\n\r\n").encode()


# --- the clean cluster: failed writes only ------------------------------------------------------


@pytest.fixture(scope="module")
def clean_volumes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NginxVolume]]:
    started = start_volumes(tmp_path_factory.mktemp("clean-volumes"), 3)
    yield started
    for volume in started:
        volume.stop()


@pytest.fixture(scope="module")
def limited(clean_volumes: list[NginxVolume],
            start_shared_service: Callable[..., MkvService]) -> MkvService:
    """replicas=3, `max-value-bytes` 3 MiB (three chunks), over the clean volumes."""
    return start_shared_service(clean_volumes, replicas=3,
                                extra=["--max-value-bytes", str(LIMIT)])


def files_kept(volumes: list[NginxVolume]) -> list[Path]:
    """Every file on the volumes but nginx's own runtime directory and the disk's identity
    marker: blobs, sidecars, and bodies left in the spool (.tmp)."""
    return [p for vol in volumes for p in vol.root.rglob("*")
            if p.is_file() and WORKDIR_NAME not in p.relative_to(vol.root).parts
            and p != vol.root / MARKER]


def assert_nothing_left(svc: MkvService, volumes: list[NginxVolume], key: str) -> None:
    """No file on any volume (nginx drops a cut-off body a moment after its connection
    closes: waited for), no record, no lock."""
    wait_until(lambda: not files_kept(volumes), TIMEOUT, f"the volumes to hold nothing: "
               f"{files_kept(volumes)}")
    assert index_record(svc, key) is None
    assert health_locks(svc) == 0


def send_while_reading(svc: MkvService, head: bytes, body: Iterator[bytes]) -> bytes:
    """Send `head`, then `body` from a thread, while the answer is read: a server that
    answers mid-body (413) stops reading, and the sender's write then fails."""
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=TIMEOUT)

    def send() -> None:
        try:
            sock.sendall(head)
            for part in body:
                sock.sendall(part)
        except OSError:
            pass  # the server answered and closed: what this test is about

    sender = threading.Thread(target=send)
    sender.start()
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            try:
                more = sock.recv(65536)
            except ConnectionResetError:  # the server closed on the unread rest of the body
                break
            if not more:
                break
            answer += more
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already reset by the server
        sender.join(TIMEOUT)
        sock.close()
    return answer


# --- chunked bodies that are stored --------------------------------------------------------------


def test_curl_upload_from_a_pipe_is_stored_whole(shared_service: MkvService,
                                                 shared_volumes: list[NginxVolume]) -> None:
    """`curl -T -` reads stdin and, not knowing its length, sends it chunked."""
    key = "/chunked/curl.bin"
    data = os.urandom(20 * MiB)
    done = subprocess.run(["curl", "-sS", "-T", "-", "-o", "/dev/null", "-w", "%{http_code}",
                           "-H", "X-Request-Id: curl-pipe-20m", kurl(shared_service, key)],
                          input=data, capture_output=True, timeout=120, check=False)
    assert done.stdout == b"201", (done.stdout, done.stderr)
    md5 = hashlib.md5(data).hexdigest()
    assert hashlib.md5(read(shared_service, key)).hexdigest() == md5
    record = index_record(shared_service, key)
    assert record.size == len(data) and record.md5 == md5 and len(record.volumes) == 3
    # every replica whole, with its sidecar saying the counted size
    blobs = [p for p in disk_files(shared_volumes, key) if not p.name.endswith(".key")]
    assert len(blobs) == 3 and all(p.stat().st_size == len(data) for p in blobs)
    sidecars = [p for p in disk_files(shared_volumes, key) if p.name.endswith(".key")]
    assert all(f'"size": {len(data)}' in p.read_text() for p in sidecars)
    # the access line counts the decoded body bytes read
    assert access_line(shared_service, "curl-pipe-20m")["bytes_in"] == str(len(data))


@pytest.mark.parametrize("size, step", [(5 * MiB + 7, 300_000), (MiB, 64 * 1024),
                                        (MiB + 1, MiB + 1), (10, 3)])
def test_a_generator_body_is_stored(shared_service: MkvService, size: int, step: int) -> None:
    """requests sends a generator chunked; around one chunk (1 MiB) the Store switches
    from the small path to the streamed one."""
    key = f"/chunked/gen-{size}-{step}"
    data = os.urandom(size)
    r = requests.put(kurl(shared_service, key), data=chunks_of(data, step), timeout=TIMEOUT)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in r.request.headers
    assert r.status_code == 201, r.text
    assert read(shared_service, key) == data
    assert index_record(shared_service, key).md5 == hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("size", [1000, 2 * MiB])
def test_a_chunked_body_with_a_wrong_content_md5_is_400_and_not_kept(
        shared_service: MkvService, shared_volumes: list[NginxVolume], size: int) -> None:
    key = f"/chunked/md5-{size}"
    data = os.urandom(size)
    r = requests.put(kurl(shared_service, key), data=chunks_of(data, 100_000), timeout=TIMEOUT,
                     headers={"Content-MD5": hashlib.md5(data + b"!").hexdigest()})
    assert_json_error(r, 400)
    assert r.json()["error"] == "bad_digest"
    assert index_record(shared_service, key) is None
    wait_until(lambda: not disk_files(shared_volumes, key), TIMEOUT, "the copies to go")


def test_expect_100_continue_with_a_chunked_body(shared_service: MkvService) -> None:
    """curl sends Expect: 100-continue with a large upload and waits for the 100 first."""
    data = os.urandom(2 * MiB + 5)
    head = chunked_head(shared_service, "/chunked/expect", "expect-1",
                        "Expect: 100-continue\r\n")
    lines = raw_exchange(shared_service, head, body=chunked(data, 256 * 1024))
    assert lines == [b"HTTP/1.1 100 Continue", b"HTTP/1.1 201 Created"]
    assert read(shared_service, "/chunked/expect") == data


def test_an_empty_chunked_body_is_411(shared_service: MkvService,
                                      shared_volumes: list[NginxVolume]) -> None:
    head = chunked_head(shared_service, "/chunked/empty", "empty-1")
    lines = raw_exchange(shared_service, head + b"0\r\n\r\n")
    assert lines == [b"HTTP/1.1 411 Length Required"]
    assert index_record(shared_service, "/chunked/empty") is None
    assert disk_files(shared_volumes, "/chunked/empty") == []


# --- chunked bodies that are not stored: nothing anywhere ----------------------------------------


@pytest.mark.parametrize("size", [LIMIT + 1, 8 * MiB])
def test_a_chunked_body_over_the_limit_is_413_and_nothing_is_kept(
        limited: MkvService, clean_volumes: list[NginxVolume], size: int) -> None:
    """Cut off mid-stream, after the first three chunks went to every volume."""
    key = f"/limit/over-{size}"
    data = os.urandom(size)
    answer = send_while_reading(limited, chunked_head(limited, key, f"over-{size}"),
                                iter([chunked(data, 256 * 1024)]))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert access_line(limited, f"over-{size}")["status"] == "413"
    assert_nothing_left(limited, clean_volumes, key)


def test_a_chunked_body_cut_off_by_its_client_leaves_nothing(
        limited: MkvService, clean_volumes: list[NginxVolume]) -> None:
    """Two and a half chunks sent, streamed to the volumes, then the connection closes
    without the last chunk."""
    key = "/torn/streamed"
    framed = chunked(os.urandom(2 * MiB + MiB // 2), 128 * 1024)
    with socket.create_connection(("127.0.0.1", limited.port), timeout=TIMEOUT) as sock:
        sock.sendall(chunked_head(limited, key, "torn-streamed"))
        sock.sendall(framed[:-len(b"0\r\n\r\n") - 1000])  # mid-chunk, no last chunk
    assert access_line(limited, "torn-streamed")["status"] == "400"
    assert_nothing_left(limited, clean_volumes, key)


def test_a_small_chunked_body_cut_off_leaves_nothing(
        limited: MkvService, clean_volumes: list[NginxVolume]) -> None:
    """Within the first chunk: the body never reaches a volume."""
    key = "/torn/small"
    with socket.create_connection(("127.0.0.1", limited.port), timeout=TIMEOUT) as sock:
        sock.sendall(chunked_head(limited, key, "torn-small") + b"5\r\nhello\r\n3\r\nab")
    assert access_line(limited, "torn-small")["status"] == "400"
    assert_nothing_left(limited, clean_volumes, key)


def test_a_malformed_chunk_is_400_and_nothing_is_kept(
        limited: MkvService, clean_volumes: list[NginxVolume]) -> None:
    key = "/torn/malformed"
    body = chunked(os.urandom(MiB + 100), 256 * 1024)[:-5] + b"zz\r\n"  # a bad size line
    lines = raw_exchange(limited, chunked_head(limited, key, "malformed") + body)
    assert lines == [b"HTTP/1.1 400 Bad Request"]
    assert_nothing_left(limited, clean_volumes, key)


def test_a_chunked_body_of_exactly_the_limit_is_stored(
        limited: MkvService, clean_volumes: list[NginxVolume]) -> None:
    """Last on the clean cluster: the one write that succeeds."""
    key = "/limit/exact"
    data = os.urandom(LIMIT)
    r = requests.put(kurl(limited, key), data=chunks_of(data, MiB // 2), timeout=TIMEOUT)
    assert r.status_code == 201, r.text
    assert read(limited, key) == data


def test_a_chunked_body_whose_replica_fails_is_502_and_kept_nowhere(
        failing_service: MkvService, shared_volumes: list[NginxVolume]) -> None:
    """The fake volume answers 500 at once: the two other bodies are cut off, never
    ended (an ended chunked body would be a blob of what was sent so far)."""
    key = "/chunked/replica-fails"
    r = requests.put(kurl(failing_service, key), data=chunks_of(os.urandom(5 * MiB), MiB),
                     timeout=TIMEOUT)
    assert_json_error(r, 502)
    assert index_record(failing_service, key) is None
    wait_until(lambda: not disk_files(shared_volumes[:2], key) and not spooled(shared_volumes),
               TIMEOUT, "the copies and the spool to go")

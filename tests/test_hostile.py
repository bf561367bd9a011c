"""Hostile input against a live service: every request below gets a 4xx, nothing is kept
(no key in the index, no file on any volume), no file appears outside a volume root, and
no response header carries the attacker's bytes.

Requests are written byte for byte on a socket: HTTP client libraries would normalise or
refuse most of them before they left."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.cluster import NginxVolume
from tests.helpers import TIMEOUT
from tests.service import MkvService

#: Written into every hostile request: it must never come back in a response header,
#: never name a file, never become a key.
MARK = "pwnmark"


def exchange(svc: MkvService, head: bytes, body: bytes = b"") -> tuple[int, list[tuple[str, str]], bytes]:
    """Send one hand-written request (Connection: close added) and read the whole answer."""
    if not head.endswith(b"\r\n\r\n"):
        head += b"\r\n\r\n"
    head = head[:-2] + b"Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", svc.port), timeout=TIMEOUT) as sock:
        sock.sendall(head + body)
        data = b""
        while True:
            try:
                more = sock.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            data += more
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), data[:200]
    status = int(lines[0].split()[1])
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if ":" in line]
    return status, headers, rest


def request(method: str, target: str, svc: MkvService, headers: str = "", body: bytes = b"") -> bytes:
    extra = f"Content-Length: {len(body)}\r\n" if body else ""
    return (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\n{extra}{headers}\r\n"
            .encode("latin-1"))


@pytest.fixture(scope="module")
def svc(shared_service: MkvService) -> MkvService:
    return shared_service


def assert_clean_refusal(status: int, headers: list[tuple[str, str]]) -> None:
    assert 400 <= status < 500, status
    for name, value in headers:
        assert MARK not in name.lower() and MARK not in value.lower(), (name, value)
        assert name.lower() not in ("set-cookie", "location") or status == 302


TRAVERSALS = [
    f"/../{MARK}", f"/a/../../{MARK}", f"/%2e%2e/%2e%2e/{MARK}", f"/%2E%2E%2F%2E%2E%2F{MARK}",
    f"/..%2f..%2f{MARK}", f"/..\\..\\{MARK}", f"/%5c..%5c..%5c{MARK}", f"/.%2e/{MARK}",
    f"/./{MARK}", "/a/..", f"/{MARK}/.", f"/%2e/{MARK}", f"/x/%2E%2e/{MARK}",
    f"http://127.0.0.1:1/../../{MARK}", f"https://evil.example/../{MARK}",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_path_traversal_in_every_spelling_is_refused(svc: MkvService, target: str) -> None:
    status, headers, _ = exchange(svc, request("PUT", target, svc, body=b"v"), b"v")
    assert_clean_refusal(status, headers)
    for method in ("GET", "DELETE"):
        status, headers, _ = exchange(svc, request(method, target, svc))
        assert_clean_refusal(status, headers)


INJECTIONS = [
    f"/a%0d%0aSet-Cookie:%20{MARK}=1", f"/a%0aX-{MARK}:%201", f"/nul%00{MARK}",
    f"/overlong%c0%af{MARK}", f"/overlong%e0%80%af{MARK}", f"/bad%ff{MARK}", f"/surrogate%ed%a0%80{MARK}",
    "/" + "k" * 5000 + MARK,
]


@pytest.mark.parametrize("target", INJECTIONS)
def test_control_bytes_and_bad_utf8_in_keys_are_refused(svc: MkvService, target: str) -> None:
    for method in ("PUT", "GET", "HEAD", "DELETE", "UNLINK"):
        body = b"v" if method == "PUT" else b""
        status, headers, _ = exchange(svc, request(method, target, svc, body=body), body)
        assert_clean_refusal(status, headers)


def test_raw_cr_lf_in_the_request_line_is_refused(svc: MkvService) -> None:
    head = (f"GET /a\rSet-Cookie: {MARK} HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    status, headers, _ = exchange(svc, head)
    assert_clean_refusal(status, headers)


@pytest.mark.parametrize("name, value", [
    ("X-Big", "a" * 65536),
    (f"X-{MARK}", "a\x00b"),
])
def test_oversized_and_nul_headers_are_refused(svc: MkvService, name: str, value: str) -> None:
    status, headers, _ = exchange(svc, request("PUT", f"/h/{MARK}", svc, f"{name}: {value}\r\n",
                                               b"v"), b"v")
    assert_clean_refusal(status, headers)


def test_a_huge_query_string_is_refused(svc: MkvService) -> None:
    status, headers, _ = exchange(svc, request("GET", "/q/?list&start=" + "a" * 100_000 + MARK, svc))
    assert_clean_refusal(status, headers)


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "0x10", " 5 5", "18446744073709551617"])
def test_bad_content_lengths_are_refused(svc: MkvService, length: str) -> None:
    head = request("PUT", f"/cl/{MARK}", svc, f"Content-Length: {length}\r\n")
    status, headers, _ = exchange(svc, head, b"vvvvv")
    assert_clean_refusal(status, headers)


def test_both_content_length_and_transfer_encoding_are_refused(svc: MkvService) -> None:
    head = request("PUT", f"/smuggle/{MARK}", svc,
                   "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n")
    status, headers, _ = exchange(svc, head, b"5\r\nhello\r\n0\r\n\r\n")
    assert_clean_refusal(status, headers)


def test_range_abuse_on_the_redirect_gets_a_plain_redirect(svc: MkvService) -> None:
    """Range is the volume's business: mkv answers its usual 302, echoes nothing of the
    header, and nginx's answer to a thousand ranges is bounded."""
    key = "/range/k"
    status, _, _ = exchange(svc, request("PUT", key, svc, body=b"0123456789"), b"0123456789")
    assert status == 201
    ranges = "bytes=" + ",".join("0-0" for _ in range(1000)) + MARK
    status, headers, body = exchange(svc, request("GET", key, svc, f"Range: {ranges}\r\n"))
    assert status == 302 and body == b""
    assert all(MARK not in v and "0-0" not in v for _, v in headers)


def names_under(base: Path) -> Iterator[str]:
    """Every file and directory name under `base` (files vanishing meanwhile skipped)."""
    for _, dirs, files in os.walk(base, onerror=lambda exc: None):
        yield from dirs
        yield from files


def test_nothing_was_kept_anywhere(svc: MkvService, shared_volumes: list[NginxVolume]) -> None:
    """Runs after the module's hostile requests: no key and no file carries the mark."""
    keys = requests.get(svc.url + "/?list", timeout=TIMEOUT).json()["keys"]
    assert [k for k in keys if MARK in k] == []
    for vol in shared_volumes:
        for path in vol.root.rglob("*"):
            assert MARK not in path.name
            if path.suffix == ".key":
                assert MARK.encode() not in path.read_bytes()
    # where a path relative to a volume root (or to the service) would have led
    for base in {v.root.parent for v in shared_volumes} | {svc.workdir}:
        assert [n for n in names_under(base) if MARK in n] == []
    for top in (Path("/tmp"), Path("/"), Path.cwd()):
        assert [p.name for p in top.iterdir() if MARK in p.name] == []

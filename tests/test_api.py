"""The HTTP API end to end: a real `mkv serve` over real nginx volumes, no mocks.

Every test talks HTTP to the service (with `requests`, or with http.client / a raw socket
where `requests` would rewrite the request), then checks what a client sees (statuses,
bodies, headers), what is on the volumes' disks and what the index holds.

To keep the file fast, one service over three volumes is shared by the module
(`svc`); each test uses its own keys (a per-test prefix). Services with other settings
(protect, a size limit, a fallback, a failing fake volume) are started once each.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import http.server
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

import apsw
import pytest
import requests

from mkv.index import schema
from mkv.model import Record, State
from tests.cluster import NginxVolume
from tests.service import MkvService

TIMEOUT = 30


# --- helpers ---------------------------------------------------------------------------


def sha(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def blob_rel(key: str) -> str:
    h = sha(key)
    return f"/{h[0:2]}/{h[2:4]}/{h}"


def disk_files(volumes: list[NginxVolume], key: str) -> list[Path]:
    """The key's blob and sidecar files that exist on any of the volumes' disks."""
    rel = blob_rel(key).lstrip("/")
    found = []
    for vol in volumes:
        for path in (vol.root / rel, vol.root / (rel + ".key")):
            if path.exists():
                found.append(path)
    return found


def spooled(volumes: list[NginxVolume]) -> list[Path]:
    """Request bodies nginx is still holding in its spool (.tmp): partial uploads."""
    return [p for vol in volumes for p in (vol.root / ".tmp").rglob("*") if p.is_file()]


def index_record(svc: MkvService, key: str) -> Record | None:
    """The key's row in the service's index, read straight from the SQLite file."""
    conn = apsw.Connection(svc.db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return schema.read_record(conn, key)
    finally:
        conn.close()


def url(svc: MkvService, path: str) -> str:
    """Service URL of an already percent-encoded path."""
    return svc.url + path


def kurl(svc: MkvService, key: str) -> str:
    """Service URL of a key, percent-encoded so it arrives unchanged."""
    return svc.url + quote(key, safe="/")


def put(svc: MkvService, key: str, body: bytes, **kw: object) -> requests.Response:
    return requests.put(kurl(svc, key), data=body, timeout=TIMEOUT, **kw)


def get(svc: MkvService, key: str) -> requests.Response:
    """GET without following the redirect."""
    return requests.get(kurl(svc, key), allow_redirects=False, timeout=TIMEOUT)


def read(svc: MkvService, key: str) -> bytes:
    """The value as a client reads it: GET, follow the 302 to the volume."""
    r = get(svc, key)
    assert r.status_code == 302, (key, r.status_code, r.text)
    data = requests.get(r.headers["Location"], timeout=TIMEOUT)
    assert data.status_code == 200
    return data.content


def listing(svc: MkvService, path_and_query: str) -> dict:
    r = requests.get(url(svc, path_and_query), timeout=TIMEOUT)
    assert r.status_code == 200, (path_and_query, r.status_code, r.text)
    return r.json()


def assert_json_error(r: requests.Response | tuple[int, dict, bytes], status: int) -> dict:
    """The response has `status` and the JSON error body {"error", "detail"}."""
    if isinstance(r, tuple):
        code, headers, body = r
    else:
        code, headers, body = r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content
    assert code == status, (code, body)
    assert headers.get("content-type", "").startswith("application/json"), headers
    doc = json.loads(body)
    assert set(doc) == {"error", "detail"}, doc
    assert isinstance(doc["error"], str) and doc["error"]
    assert isinstance(doc["detail"], str)
    return doc


def raw(svc: MkvService, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request with the path sent byte for byte (no client-side normalization)."""
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def escape_all(key: str) -> str:
    """The key as a path with every byte except "/" percent-encoded (dots included, which
    requests/urllib3 would otherwise resolve as dot segments)."""
    return "".join("/" if b == 0x2F else f"%{b:02X}" for b in key.encode("utf-8"))


def raw_read(svc: MkvService, path: str) -> bytes:
    status, headers, _ = raw(svc, "GET", path)
    assert status == 302, (path, status)
    r = requests.get(headers["location"], timeout=TIMEOUT)
    assert r.status_code == 200
    return r.content


def health_locks(svc: MkvService) -> int:
    return requests.get(url(svc, "/-/health"), timeout=TIMEOUT).json()["writer"]["locks"]


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class SlowBody:
    """A request body with a known length, sent chunk by chunk with pauses.

    `__len__` makes requests send a Content-Length (not chunked encoding);
    `started` is set once the first chunk is on the wire.
    """

    def __init__(self, data: bytes, chunks: int, delay: float) -> None:
        self.data = data
        self.step = -(-len(data) // chunks)
        self.delay = delay
        self.started = threading.Event()

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), self.step):
            yield self.data[i:i + self.step]
            self.started.set()
            time.sleep(self.delay)


class FakeVolume:
    """A "volume" that answers every PUT with `put_status` (after reading the body) and
    everything else with 404: a disk that fails (500) or is full (507)."""

    def __init__(self) -> None:
        fake = self
        self.put_status = 500
        self.puts: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                fake.puts.append(self.path)
                left = int(self.headers.get("Content-Length") or 0)
                try:
                    while left > 0:
                        chunk = self.rfile.read(min(left, 1 << 16))
                        if not chunk:
                            break
                        left -= len(chunk)
                except OSError:
                    return
                self._answer(fake.put_status)

            def _answer(self, status: int) -> None:
                body = b"fake volume\n"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                # the server itself is alive: health probes pass, only its disk fails
                self._answer(200 if self.path == "/-/ping" else 404)

            do_HEAD = do_DELETE = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --- fixtures: started once for the module, everything stopped at the end ------------------


@pytest.fixture(scope="module")
def vols(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NginxVolume]]:
    base = tmp_path_factory.mktemp("api-volumes")
    with contextlib.ExitStack() as stack:
        started = []
        for i in range(3):
            started.append(stack.enter_context(NginxVolume.start(base / f"vol{i + 1}")))
        yield started


@pytest.fixture(scope="module")
def start_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., MkvService]]:
    """Factory: start_service([addresses], **MkvService kwargs); all stopped at module end."""
    started: list[MkvService] = []

    def start(addresses: list[str], **kw: object) -> MkvService:
        svc = MkvService(tmp_path_factory.mktemp("api-svc"), addresses, **kw)
        started.append(svc)
        return svc.start()

    yield start
    # Stopped in parallel: each waits for gunicorn's graceful shutdown.
    with ThreadPoolExecutor(max_workers=max(1, len(started))) as pool:
        list(pool.map(MkvService.stop, started))


@pytest.fixture(scope="module")
def svc(vols: list[NginxVolume], start_service: Callable[..., MkvService]) -> MkvService:
    """The shared service: 3 volumes, replicas=3, default settings."""
    return start_service([v.address for v in vols], replicas=3)


# --- 1. round trip -----------------------------------------------------------------------


def test_round_trip_redirects_to_a_replica_with_headers_and_files_on_every_volume(
        svc: MkvService, vols: list[NginxVolume]) -> None:
    key = "/rt/hello.bin"
    body = os.urandom(300_000)
    md5 = hashlib.md5(body).hexdigest()
    h = sha(key)

    r = put(svc, key, body)
    assert r.status_code == 201, r.text

    addresses = {v.address for v in vols}
    r = get(svc, key)
    assert r.status_code == 302
    loc = urlsplit(r.headers["Location"])
    assert loc.scheme == "http"
    assert loc.netloc in addresses
    assert loc.path == f"/{h[0:2]}/{h[2:4]}/{h}"
    assert r.headers["Content-Md5"] == md5
    key_volumes = r.headers["Key-Volumes"].split(",")
    assert len(key_volumes) == 3 and set(key_volumes) == addresses
    assert r.headers["Key-Balance"] == "balanced"
    assert r.content == b""

    # Following the redirect gives back the exact bytes (requests follows it itself).
    followed = requests.get(kurl(svc, key), timeout=TIMEOUT)
    assert followed.status_code == 200
    assert followed.content == body
    assert [x.status_code for x in followed.history] == [302]

    head = requests.head(kurl(svc, key), allow_redirects=False, timeout=TIMEOUT)
    assert head.status_code == 302
    assert head.content == b""
    for name in ("Content-Md5", "Key-Volumes", "Key-Balance"):
        assert head.headers[name] == r.headers[name]
    assert urlsplit(head.headers["Location"]).path == loc.path

    # Every replica, read directly from the volume, has the bytes.
    for vol in vols:
        assert requests.get(vol.url + loc.path, timeout=TIMEOUT).content == body

    # On disk: blob and one-line JSON sidecar on all three roots.
    for vol in vols:
        blob = vol.root / h[0:2] / h[2:4] / h
        sidecar = vol.root / h[0:2] / h[2:4] / (h + ".key")
        assert blob.read_bytes() == body
        text = sidecar.read_text("utf-8")
        assert text.endswith("\n") and text.count("\n") == 1
        assert json.loads(text) == {"key": key, "size": len(body), "md5": md5}

    rec = index_record(svc, key)
    assert rec is not None and rec.state is State.LIVE
    assert set(rec.volumes) == addresses and rec.size == len(body) and rec.md5 == md5


# --- 2. bodies that cannot be stored, overwrite --------------------------------------------


def test_put_without_a_usable_length_is_411(svc: MkvService, vols: list[NginxVolume]) -> None:
    assert_json_error(put(svc, "/len/empty", b""), 411)

    def chunks() -> Iterator[bytes]:
        yield b"abc"
        yield b"def"

    r = requests.put(kurl(svc, "/len/chunked"), data=chunks(), timeout=TIMEOUT)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in r.request.headers
    assert_json_error(r, 411)

    # No Content-Length and no body at all.
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=TIMEOUT)
    try:
        conn.putrequest("PUT", "/len/none")
        conn.endheaders()
        resp = conn.getresponse()
        assert_json_error((resp.status, {k.lower(): v for k, v in resp.getheaders()},
                           resp.read()), 411)
    finally:
        conn.close()

    for key in ("/len/empty", "/len/chunked", "/len/none"):
        assert get(svc, key).status_code == 404
        assert disk_files(vols, key) == []


def test_overwrite_of_a_live_key_is_403_and_keeps_the_value(svc: MkvService) -> None:
    key = "/ow/key"
    assert put(svc, key, b"original").status_code == 201
    before = get(svc, key).headers["Content-Md5"]
    assert_json_error(put(svc, key, b"replacement!"), 403)
    assert read(svc, key) == b"original"
    assert get(svc, key).headers["Content-Md5"] == before == hashlib.md5(b"original").hexdigest()


# --- 3. concurrent writers ------------------------------------------------------------------


def test_concurrent_puts_of_one_key_one_wins_one_409(svc: MkvService) -> None:
    key = "/race/key"
    slow = SlowBody(os.urandom(1 << 20), chunks=8, delay=0.15)
    fast_body = b"the second writer"
    results: dict[str, requests.Response] = {}

    def first() -> None:
        results["slow"] = requests.put(kurl(svc, key), data=slow, timeout=TIMEOUT)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert slow.started.wait(10), "the slow PUT never started sending"
        time.sleep(0.3)  # the service has the headers and holds the key's lock by now
        assert not results, "the slow PUT finished too early for the race"
        results["fast"] = put(svc, key, fast_body)
    finally:
        t.join(TIMEOUT)
    assert sorted(r.status_code for r in results.values()) == [201, 409], {
        k: (r.status_code, r.text) for k, r in results.items()}
    assert results["slow"].status_code == 201
    assert_json_error(results["fast"], 409)
    assert read(svc, key) == slow.data
    assert index_record(svc, key).md5 == hashlib.md5(slow.data).hexdigest()


# --- 4. hostile keys ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/long/" + "k" * 1019,                     # 1025 bytes
    "/long/" + "%C3%A9" * 510,                 # 6 + 1020 = 1026 bytes once decoded
    "/ctl/a%01b", "/ctl/a%7Fb", "/ctl/a%0Ab", "/ctl/a%0D", "/ctl/%00",
    "/utf8/%FF", "/utf8/%C3%28", "/utf8/%ED%A0%80",  # the last: an encoded surrogate
    "/-/anything", "/-/health/x", "/-", "/",
])
def test_bad_keys_are_400_with_json(svc: MkvService, path: str) -> None:
    for method, body in (("PUT", b"value"), ("GET", None), ("DELETE", None)):
        assert_json_error(raw(svc, method, path, body), 400)


def test_key_length_limit_counts_decoded_utf8_bytes(svc: MkvService) -> None:
    longest = "/long-ok/" + "k" * (1024 - 9)
    assert len(longest.encode()) == 1024
    assert put(svc, longest, b"v").status_code == 201
    assert read(svc, longest) == b"v"
    # 3 + 2 * 510 = 1023 bytes decoded, but 3 + 6 * 510 = 3063 characters on the wire.
    wide = "/w/" + "é" * 510
    assert len(wide.encode()) == 1023
    assert put(svc, wide, b"wide").status_code == 201
    assert read(svc, wide) == b"wide"
    assert_json_error(put(svc, longest + "x", b"v"), 400)


def test_hostile_but_valid_keys_round_trip_exactly(svc: MkvService) -> None:
    # raw request path -> the key it names (keys are the percent-decoded path)
    cases = {
        "/h/with%20space%20s": "/h/with space s",
        "/h/" + quote("ünï cødé/ключ/🔑"): "/h/ünï cødé/ключ/🔑",
        # sent raw: requests/urllib3 would resolve the dot segments before sending
        "/h/dots/../x": "/h/dots/../x",
        "/h/./y/..": "/h/./y/..",
        "/h//double//slash": "/h//double//slash",
        "/h/q%3Fa%26b%3Dc%23d": "/h/q?a&b=c#d",
        "/h/plus+sign": "/h/plus+sign",
        "/h/pct%2541": "/h/pct%41",
        "/h/slash%2Fenc": "/h/slash/enc",
    }
    for i, (path, key) in enumerate(cases.items()):
        value = f"value {i} of {key!r}".encode()
        status, _, body = raw(svc, "PUT", path, value)
        assert status == 201, (path, status, body)
        assert raw_read(svc, path) == value, path
        # The same key spelled with every byte but "/" escaped names the same value.
        assert raw_read(svc, escape_all(key)) == value, key
        h = sha(key)
        status, headers, _ = raw(svc, "GET", path)
        assert urlsplit(headers["location"]).path == f"/{h[0:2]}/{h[2:4]}/{h}"

    # %2F decodes to "/" like any other escape, so /h/slash%2Fenc and /h/slash/enc are one
    # key: writing the other spelling finds it live.
    assert raw(svc, "PUT", "/h/slash/enc", b"again")[0] == 403
    assert raw_read(svc, "/h/slash%2Fenc") == raw_read(svc, "/h/slash/enc")

    # ?list answers the decoded keys, sorted by UTF-8 bytes.
    keys = listing(svc, "/h/?list")["keys"]
    assert keys == sorted(cases.values(), key=lambda k: k.encode())


def raw_exchange(svc: MkvService, request: bytes, body: bytes = b"") -> list[bytes]:
    """Send a hand-written request on a socket (then `body`, after any 100 Continue);
    return the status lines received, in order."""
    with socket.create_connection(("127.0.0.1", svc.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        if body:
            interim = sock.recv(1024)
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            sock.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    lines = [ln for ln in data.split(b"\r\n") if ln.startswith(b"HTTP/1.1 ")]
    return ([interim.split(b"\r\n")[0]] if body else []) + lines


def test_absolute_form_and_expect_continue(svc: MkvService) -> None:
    """What proxies (absolute-form target) and curl (Expect: 100-continue) send."""
    host = f"127.0.0.1:{svc.port}"
    lines = raw_exchange(svc, f"PUT http://{host}/abs/k%20ey HTTP/1.1\r\nHost: {host}\r\n"
                              "Content-Length: 3\r\nConnection: close\r\n\r\nabc".encode())
    assert lines == [b"HTTP/1.1 201 Created"]
    assert read(svc, "/abs/k ey") == b"abc"

    lines = raw_exchange(svc, f"PUT /exp/key HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
                              "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode(),
                         body=b"hello")
    assert lines == [b"HTTP/1.1 100 Continue", b"HTTP/1.1 201 Created"]
    assert read(svc, "/exp/key") == b"hello"


# --- 5. listing -------------------------------------------------------------------------------


def test_list_prefix_and_paging(svc: MkvService) -> None:
    inside = [f"/p/{i:02d}-{'x' * (i % 3)}" for i in range(25)]
    outside = ["/p", "/p0", "/pa/x", "/o/p/x", "/q/p/"]
    for key in inside + outside:
        assert put(svc, key, key.encode()).status_code == 201, key

    doc = listing(svc, "/p/?list")
    assert doc == {"next": "", "keys": sorted(inside)}

    seen: list[str] = []
    start, pages = "", 0
    while True:
        q = "/p/?list&limit=10" + (f"&start={quote(start, safe='')}" if start else "")
        doc = listing(svc, q)
        assert len(doc["keys"]) <= 10
        seen += doc["keys"]
        pages += 1
        start = doc["next"]
        if not start:
            break
        assert start not in doc["keys"] and start > doc["keys"][-1]
    assert pages == 3
    assert seen == sorted(inside) and len(set(seen)) == 25

    # The bare prefix "/" lists everything, including the keys outside /p/.
    everything = listing(svc, "/?list")["keys"]
    assert set(inside + outside) <= set(everything)
    assert everything == sorted(everything, key=lambda k: k.encode())


@pytest.mark.parametrize("query", [
    "/p/?list&limit=abc", "/p/?list&limit=0", "/p/?list&limit=-1", "/p/?list&limit=",
    "/p/?list&limit=1.5", "/p/?list&bogus=1", "/p/?list&unlinked", "/p/?list&list",
    "/p/?start=a", "/somekey?foo=bar", "/somekey?",
])
def test_bad_queries_are_400_with_json(svc: MkvService, query: str) -> None:
    r = requests.get(url(svc, query), allow_redirects=False, timeout=TIMEOUT)
    if query.endswith("?"):
        # An empty query string is no query at all: a plain GET of a missing key.
        assert_json_error(r, 404)
        return
    assert_json_error(r, 400)


def test_queries_on_writes_are_refused(svc: MkvService, vols: list[NginxVolume]) -> None:
    """A query never gets silently dropped from a write: PUT /k?x=1 must not store /k."""
    for method, path in (("PUT", "/lp/?list"), ("PUT", "/lp/key?x=1"), ("PUT", "/lp/key?list"),
                         ("DELETE", "/lp/key?list"), ("UNLINK", "/lp/?unlinked")):
        assert_json_error(raw(svc, method, path, b"x" if method == "PUT" else None), 400)
    assert_json_error(get(svc, "/lp/key"), 404)
    assert disk_files(vols, "/lp/key") == []
    assert listing(svc, "/lp/?list") == {"next": "", "keys": []}


def test_unlinked_lists_only_unlinked_keys(svc: MkvService) -> None:
    keys = [f"/ul/{c}" for c in "abcd"]
    for key in keys:
        assert put(svc, key, b"v").status_code == 201
    for key in keys[1:3]:
        assert requests.request("UNLINK", kurl(svc, key), timeout=TIMEOUT).status_code == 204
    assert listing(svc, "/ul/?unlinked") == {"next": "", "keys": keys[1:3]}
    assert listing(svc, "/ul/?list") == {"next": "", "keys": [keys[0], keys[3]]}
    page = listing(svc, "/ul/?unlinked&limit=1")
    assert page == {"next": keys[2], "keys": [keys[1]]}


# --- 6. DELETE and UNLINK ---------------------------------------------------------------------


def test_delete_removes_the_key_and_its_files(svc: MkvService, vols: list[NginxVolume]) -> None:
    key = "/del/key"
    assert put(svc, key, b"to be deleted").status_code == 201
    assert len(disk_files(vols, key)) == 6

    r = requests.delete(kurl(svc, key), timeout=TIMEOUT)
    assert r.status_code == 204 and r.content == b""
    assert_json_error(get(svc, key), 404)
    assert disk_files(vols, key) == []
    assert index_record(svc, key) is None
    assert key not in listing(svc, "/del/?list")["keys"]

    assert_json_error(requests.delete(kurl(svc, key), timeout=TIMEOUT), 404)
    assert_json_error(requests.delete(kurl(svc, "/del/never"), timeout=TIMEOUT), 404)


def test_unlink_hides_the_key_but_keeps_the_files(svc: MkvService, vols: list[NginxVolume]) -> None:
    key = "/unl/key"
    assert put(svc, key, b"first").status_code == 201
    unlink = lambda: requests.request("UNLINK", kurl(svc, key), timeout=TIMEOUT)  # noqa: E731

    r = unlink()
    assert r.status_code == 204 and r.content == b""
    assert_json_error(get(svc, key), 404)
    assert requests.head(kurl(svc, key), timeout=TIMEOUT).status_code == 404
    assert listing(svc, "/unl/?unlinked")["keys"] == [key]
    assert listing(svc, "/unl/?list")["keys"] == []
    assert len(disk_files(vols, key)) == 6  # blobs and sidecars stay
    assert index_record(svc, key).state is State.UNLINKED
    assert_json_error(unlink(), 404)
    assert_json_error(requests.request("UNLINK", kurl(svc, "/unl/never"), timeout=TIMEOUT), 404)

    # An unlinked key may be written again, and then reads the new value.
    assert put(svc, key, b"second value").status_code == 201
    assert read(svc, key) == b"second value"
    assert listing(svc, "/unl/?unlinked")["keys"] == []
    assert listing(svc, "/unl/?list")["keys"] == [key]
    assert index_record(svc, key).state is State.LIVE

    # DELETE of an unlinked key removes it for good.
    assert unlink().status_code == 204
    assert requests.delete(kurl(svc, key), timeout=TIMEOUT).status_code == 204
    assert listing(svc, "/unl/?unlinked")["keys"] == []
    assert disk_files(vols, key) == []


def test_protect_requires_unlink_before_delete(vols: list[NginxVolume],
                                               start_service: Callable[..., MkvService]) -> None:
    psvc = start_service([v.address for v in vols], extra=["--protect", "true"])
    key = "/prot/key"
    assert put(psvc, key, b"precious").status_code == 201
    assert_json_error(requests.delete(kurl(psvc, key), timeout=TIMEOUT), 403)
    assert read(psvc, key) == b"precious"
    assert len(disk_files(vols, key)) == 6

    assert requests.request("UNLINK", kurl(psvc, key), timeout=TIMEOUT).status_code == 204
    assert requests.delete(kurl(psvc, key), timeout=TIMEOUT).status_code == 204
    assert_json_error(get(psvc, key), 404)
    assert disk_files(vols, key) == []
    assert_json_error(requests.delete(kurl(psvc, key), timeout=TIMEOUT), 404)


# --- 7. methods -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PATCH", "POST", "FOO", "OPTIONS", "PROPFIND"])
def test_unknown_methods_are_405_with_json(svc: MkvService, method: str) -> None:
    r = requests.request(method, kurl(svc, "/m/key"), data=b"x", timeout=TIMEOUT)
    doc = assert_json_error(r, 405)
    assert doc["error"] == "method_not_allowed"
    assert "PUT" in r.headers.get("Allow", "")


# --- 8. size limit ------------------------------------------------------------------------------


def test_values_over_max_value_bytes_are_413(vols: list[NginxVolume],
                                             start_service: Callable[..., MkvService]) -> None:
    lsvc = start_service([v.address for v in vols], extra=["--max-value-bytes", "1000"])
    for size in (1001, 50_000):
        key = f"/big/{size}"
        assert_json_error(put(lsvc, key, b"x" * size), 413)
        assert_json_error(get(lsvc, key), 404)
        assert disk_files(vols, key) == []
        assert index_record(lsvc, key) is None
    assert put(lsvc, "/big/1000", b"y" * 1000).status_code == 201
    assert read(lsvc, "/big/1000") == b"y" * 1000


# --- 9. Content-MD5 -----------------------------------------------------------------------------


def test_content_md5_is_checked(svc: MkvService, vols: list[NginxVolume]) -> None:
    body = os.urandom(200_000)
    digest = hashlib.md5(body).digest()

    b64 = base64.b64encode(digest).decode()
    assert put(svc, "/md5/b64", body, headers={"Content-MD5": b64}).status_code == 201
    assert put(svc, "/md5/hex", body, headers={"Content-MD5": digest.hex()}).status_code == 201
    assert put(svc, "/md5/HEX", body,
               headers={"Content-MD5": digest.hex().upper()}).status_code == 201
    for key in ("/md5/b64", "/md5/hex", "/md5/HEX"):
        assert read(svc, key) == body
        assert get(svc, key).headers["Content-Md5"] == digest.hex()

    wrong = hashlib.md5(body + b"!").digest()
    for i, header in enumerate([base64.b64encode(wrong).decode(), wrong.hex(), "not-a-digest",
                                base64.b64encode(b"short").decode()]):
        key = f"/md5/wrong{i}"
        assert_json_error(put(svc, key, body, headers={"Content-MD5": header}), 400)
        assert_json_error(get(svc, key), 404)
        assert disk_files(vols, key) == []
        assert index_record(svc, key) is None
        # and no lock was left behind: the right digest is accepted at once
        assert put(svc, key, body, headers={"Content-MD5": b64}).status_code == 201


# --- 10. a client that goes away ------------------------------------------------------------------


def test_client_disconnect_mid_upload_leaves_nothing(svc: MkvService,
                                                     vols: list[NginxVolume]) -> None:
    key = "/gone/big"
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=TIMEOUT)
    try:
        sock.sendall(f"PUT {key} HTTP/1.1\r\nHost: mkv\r\nContent-Length: {64 << 20}\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode())
        chunk = b"z" * (1 << 20)
        for _ in range(32):
            sock.sendall(chunk)
    finally:
        sock.close()

    # The upload is abandoned: its lock is released, nothing is visible, nothing is left.
    wait_until(lambda: health_locks(svc) == 0, 10, "the abandoned PUT to release its lock")
    assert_json_error(get(svc, key), 404)
    assert key not in listing(svc, "/gone/?list")["keys"]
    assert index_record(svc, key) is None
    wait_until(lambda: disk_files(vols, key) == [], 5, "partial files to be removed")
    wait_until(lambda: spooled(vols) == [], 5, "nginx to discard the partial bodies")

    body = os.urandom(1 << 20)
    deadline = time.monotonic() + 5
    while True:
        r = put(svc, key, body)
        if r.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 201, r.text
    assert read(svc, key) == body
    assert len(disk_files(vols, key)) == 6


# --- 11. a failing volume -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_volume() -> Iterator[FakeVolume]:
    fake = FakeVolume()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def failing_svc(fake_volume: FakeVolume, vols: list[NginxVolume],
                start_service: Callable[..., MkvService]) -> MkvService:
    """Two real volumes and the fake one, replicas=3: the fake is a replica of every key."""
    return start_service([v.address for v in vols[:2]] + [fake_volume.address], replicas=3)


@pytest.mark.parametrize("status", [500, 507])
def test_volume_error_during_put_fails_cleanly(status: int, fake_volume: FakeVolume,
                                               failing_svc: MkvService,
                                               vols: list[NginxVolume]) -> None:
    real, fsvc = vols[:2], failing_svc
    fake_volume.put_status = status
    key = f"/fail/{status}"
    body = os.urandom(300_000)
    before = len(fake_volume.puts)

    # a previous case's failure may still count against the fake's health (503 for a few s)
    deadline = time.monotonic() + 10
    while (r := put(fsvc, key, body)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_json_error(r, 502)
    assert r.json()["error"] == "volume_failed"
    assert fake_volume.puts[before:] == [blob_rel(key)]  # the fake really was a replica
    assert_json_error(get(fsvc, key), 404)
    assert key not in listing(fsvc, "/fail/?list")["keys"]
    assert index_record(fsvc, key) is None
    assert disk_files(real, key) == []  # partial copies on the good volumes removed
    # the lock is released: the next attempt fails again instead of 409 — as 502, or as 503
    # while the worker still counts the volume's 5xx against its health
    assert put(fsvc, key, body).status_code in (502, 503)
    assert disk_files(real, key) == []
    assert spooled(real) == []


# --- 12. missing keys and the fallback ------------------------------------------------------------


def test_missing_key_is_404_with_json(svc: MkvService) -> None:
    doc = assert_json_error(get(svc, "/missing/key"), 404)
    assert doc["error"] == "not_found"
    assert requests.head(kurl(svc, "/missing/key"), timeout=TIMEOUT).status_code == 404


def test_fallback_redirects_missing_keys(vols: list[NginxVolume],
                                         start_service: Callable[..., MkvService]) -> None:
    fallback = "127.0.0.1:9"
    fsvc = start_service([v.address for v in vols], extra=["--fallback", fallback])
    r = get(fsvc, "/fb/missing")
    assert r.status_code == 302
    assert r.headers["Location"] == f"http://{fallback}/fb/missing"
    r = get(fsvc, "/fb/with space")
    assert r.status_code == 302
    assert r.headers["Location"] == f"http://{fallback}/fb/with%20space"
    # A key the service has still goes to a volume.
    assert put(fsvc, "/fb/here", b"here").status_code == 201
    assert urlsplit(get(fsvc, "/fb/here").headers["Location"]).netloc in {v.address for v in vols}


# --- 13. health and metrics -----------------------------------------------------------------------


def test_health_and_metrics(svc: MkvService, vols: list[NginxVolume]) -> None:
    r = requests.get(url(svc, "/-/health"), timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    doc = r.json()
    assert doc["writer"]["up"] is True
    assert len(doc["volumes"]) == 3
    assert {v["volume"] for v in doc["volumes"]} == {v.address for v in vols}

    def requests_total() -> dict[tuple[str, str], float]:
        r = requests.get(url(svc, "/-/metrics"), timeout=TIMEOUT)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        out = {}
        for ln in r.text.splitlines():
            if m := re.match(r'mkv_requests_total\{method="(\w+)",status="(\d+)"\} (\S+)$', ln):
                out[m[1], m[2]] = float(m[3])
        return out

    before = requests_total()
    assert put(svc, "/metrics/key", b"m").status_code == 201
    for _ in range(3):
        get(svc, "/metrics/key")
    get(svc, "/metrics/missing")
    after = requests_total()
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in (("PUT", "201"), ("GET", "302"),
                                                             ("GET", "404"))}
    assert grown == {("PUT", "201"): 1, ("GET", "302"): 3, ("GET", "404"): 1}, (before, after)

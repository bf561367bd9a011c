"""Helpers shared by the integration tests: talking HTTP to a running `mkv serve`,
looking at what the volumes' disks and the index hold, waiting, and stand-in volumes
that fail on purpose.

Plain functions and classes; the fixtures that start processes are in conftest.py,
the processes themselves in cluster.py (nginx volumes) and service.py (`mkv serve`).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import quote

import apsw
import requests

from mkv.index import schema
from mkv.model import Record, State
from mkv.service.store import HEALTH_CACHE_SECONDS
from tests.cluster import NginxVolume
from tests.service import MkvService

#: Seconds any one request of a test may take before the test fails.
TIMEOUT = 30

#: Health settings fast enough for failure tests to be short.
REPO = Path(__file__).resolve().parent.parent

FAST_HEALTH = ["--health-interval", "0.2", "--health-timeout", "0.5", "--health-fail-count", "2",
               "--health-ok-count", "2", "--volume-timeout", "1"]


# --- names: computed here, independently of mkv.keys ------------------------------------------


def sha(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def blob_rel(key: str, gen: str = "") -> str:
    """A write's blob path on a volume: /<h[0:2]>/<h[2:4]>/<h>[.<gen>] of the key's sha256."""
    h = sha(key)
    return f"/{h[0:2]}/{h[2:4]}/{h}" + (f".{gen}" if gen else "")


def body_for(key: str, size: int = 2000) -> bytes:
    """A value that can be recomputed from its key, to check what is read back."""
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


# --- what is on the volumes' disks and in the index -----------------------------------------


def disk_files(volumes: Iterable[NginxVolume], key: str) -> list[Path]:
    """The key's blob and sidecar files, of any generation (<h>, <h>.<gen>, and each
    with .key), that exist on any of the volumes' disks."""
    rel = Path(blob_rel(key).lstrip("/"))
    found = []
    for vol in volumes:
        folder = vol.root / rel.parent
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.name.split(".")[0] == rel.name)
    return found


def on_disk(vol: NginxVolume, key: str) -> bool:
    """The key's blob or its sidecar is on this volume's disk."""
    return bool(disk_files([vol], key))


def spooled(volumes: Iterable[NginxVolume]) -> list[Path]:
    """Request bodies nginx is still holding in its spool (.tmp): partial uploads."""
    return [p for vol in volumes for p in (vol.root / ".tmp").rglob("*") if p.is_file()]


def index_record(svc: MkvService, key: str) -> Record | None:
    """The key's row in the service's index, read straight from the SQLite file."""
    conn = apsw.Connection(svc.db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return schema.read_record(conn, key)
    finally:
        conn.close()


def pending_deletes(svc: MkvService) -> list[tuple[str, str]]:
    """(key, volumes) of every record still DELETING: copies left to remove."""
    conn = apsw.Connection(svc.db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT key, volumes FROM keys WHERE state=?",
                            (int(State.DELETING),)).fetchall()
    finally:
        conn.close()


# --- the tools ------------------------------------------------------------------------------


def run_cli(volumes: list[NginxVolume] | list[str], db: str | Path, *args: str,
            replicas: int = 3, timeout: float = 120) -> subprocess.CompletedProcess:
    addresses = [v if isinstance(v, str) else v.address for v in volumes]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MKV_")} | {"MKV_CONFIG": ""}
    return subprocess.run(
        [sys.executable, "-m", "mkv.tools.rebuild", "--volumes", ",".join(addresses),
         "--db", str(db), "--replicas", str(replicas), "--volume-timeout", "5", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def rows(db: str | Path) -> dict[str, tuple]:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {r[0]: tuple(r[1:]) for r in
                conn.execute("SELECT key, state, volumes, size, md5 FROM keys")}
    finally:
        conn.close()


def pending_ops(svc: MkvService) -> list[tuple[str, str, int, int]]:
    """(key, volume, op, state) of every pending operation on a copy."""
    conn = apsw.Connection(svc.db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT key, volume, op, state FROM pending").fetchall()
    finally:
        conn.close()


# --- HTTP to the service ----------------------------------------------------------------------


class SourceAddress(requests.adapters.HTTPAdapter):
    """Connections from one local address (a client that is not one of the volumes'
    writers: those are 127.0.0.1 when a test's volumes sign their reads)."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: object, **kw: object) -> None:
        kw["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kw)


#: The client a user is: it follows redirects to the volumes from 127.0.0.2, so a volume
#: that signs its reads checks the Location the service gave it.
CLIENT = requests.Session()
CLIENT.mount("http://", SourceAddress("127.0.0.2"))


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


def fetch(svc: MkvService, key: str) -> requests.Response:
    """GET following the redirect: whatever the client ends with (200, 404, 503...)."""
    return CLIENT.get(kurl(svc, key), timeout=TIMEOUT)


def read(svc: MkvService, key: str) -> bytes:
    """The value as a client reads it: GET, follow the 302 to the volume."""
    r = get(svc, key)
    assert r.status_code == 302, (key, r.status_code, r.text)
    data = CLIENT.get(r.headers["Location"], timeout=TIMEOUT)
    assert data.status_code == 200
    return data.content


def roundtrip(base_url: str, key: str) -> None:
    """PUT a value under `key` at the service at `base_url` and read it back."""
    assert requests.put(base_url + key, data=b"value of " + key.encode(),
                        timeout=TIMEOUT).status_code == 201
    r = requests.get(base_url + key, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == b"value of " + key.encode()


def replicas_of(svc: MkvService, key: str) -> list[str]:
    """The key's volumes, from the Key-Volumes header of a HEAD."""
    r = requests.head(kurl(svc, key), allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 302, r.status_code
    return r.headers["Key-Volumes"].split(",")


def listing(svc: MkvService, path_and_query: str) -> dict:
    r = requests.get(url(svc, path_and_query), timeout=TIMEOUT)
    assert r.status_code == 200, (path_and_query, r.status_code, r.text)
    return r.json()


def health(svc: MkvService) -> dict:
    """The /-/health document (whatever its status)."""
    return requests.get(url(svc, "/-/health"), timeout=TIMEOUT).json()


def health_locks(svc: MkvService) -> int:
    """Keys the writer holds locked right now."""
    return health(svc)["writer"]["locks"]


def volume_status(svc: MkvService, address: str) -> str:
    """"up", "down" or "unknown": the volume's status as /-/health shows it."""
    for v in health(svc)["volumes"]:
        if v["volume"] == address:
            return v["status"]
    raise KeyError(address)


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


# --- requests sent byte for byte ----------------------------------------------------------------


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


def raw_read(svc: MkvService, path: str) -> bytes:
    """The value behind a raw path: GET it byte for byte, follow the 302."""
    status, headers, _ = raw(svc, "GET", path)
    assert status == 302, (path, status)
    r = CLIENT.get(headers["location"], timeout=TIMEOUT)
    assert r.status_code == 200
    return r.content


def escape_all(key: str) -> str:
    """The key as a path with every byte except "/" percent-encoded (dots included, which
    requests/urllib3 would otherwise resolve as dot segments)."""
    return "".join("/" if b == 0x2F else f"%{b:02X}" for b in key.encode("utf-8"))


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


# --- waiting ----------------------------------------------------------------------------------


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> float:
    """Poll `cond` until it is true; return the seconds that took. Fails after `timeout`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def settle() -> None:
    """Let every worker's cached view of volume health catch up."""
    time.sleep(HEALTH_CACHE_SECONDS + 0.1)


def replaced(svc: MkvService, name: str, old_pid: int) -> bool:
    """One new process named `name` runs in place of `old_pid` (one look at /proc: two
    looks could straddle the moment the old one is reaped)."""
    pids = svc.pids(name)
    return len(pids) == 1 and pids[0] != old_pid


# --- stand-in volumes -------------------------------------------------------------------------


class FakeVolume:
    """A "volume" that answers every PUT with `put_status` (after reading the body) and
    everything else with 404: a disk that fails (500) or is full (507)."""

    def __init__(self) -> None:
        fake = self
        self.put_status = 500
        self.puts: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                if not self.path.endswith("/mkv-volume.json"):  # the health process's marker
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


class SilentVolume:
    """Accepts connections and reads whatever is sent, but never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        try:
            while conn.recv(1 << 16):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.stopped = True
        self.sock.close()
        for c in self.conns:
            c.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


class Relay:
    """A TCP relay on 127.0.0.1 to `upstream_port`, to break connections the way networks
    do: what a client sends passes whole; the answers on connection n (from 0) pass up to
    `answer_limit(n)` bytes (None: all), then both sides are closed and `cut` is set."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def answer_limit(self, n: int) -> int | None:
        return None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=TIMEOUT)
            limit = self.answer_limit(self._connections)
            self._connections += 1
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, limit), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        passed = 0
        try:
            while data := src.recv(65536):
                if limit is not None and passed + len(data) > limit:
                    dst.sendall(data[:limit - passed])
                    self.cut.set()
                    break
                dst.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()

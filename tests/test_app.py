"""The HTTP app on its own: create_app(cfg, store) driven with falcon.testing over a fake
Store. Every row of the status table, without gunicorn, nginx, a writer or an index.

The fake keeps records in a dict and raises the same typed errors as mkv.service.store's
Store; `fake.fail[operation] = error` makes one operation fail with any of them. What is
checked is the app's part: which store calls a request makes, and the status, headers and
body each answer or error becomes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import wsgiref.validate
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import apsw
import pytest
from falcon.testing import Result, TestClient
from gunicorn.http.errors import InvalidChunkSize
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mkv import core
from mkv.config import Config
from mkv.core import Health
from mkv.model import HealthRow, PendingOp, PendingState, Record, State
from mkv.service.app import KEY_METHODS, create_app
from mkv.service.store import (
    BadDigest,
    ClientGone,
    EmptyValue,
    InFlight,
    KeyExists,
    KeyMissing,
    Protected,
    TooLarge,
    Unavailable,
    VolumeFailed,
)
from mkv.writer.protocol import KeyLocked, WriterError, WriterUnavailable

VOLUMES = ("a:1", "b:2", "c:3")

# UNLINK, PROPFIND, FOO: methods wsgiref.validate (run by falcon.testing) does not know
pytestmark = pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")


# --- the fake Store ---------------------------------------------------------------------------


class FakeReader:
    """Store.reader: listings from the fake's records, published health rows, the counts
    kept by the index's triggers."""

    def __init__(self, records: dict[str, Record]) -> None:
        self.records = records
        self.rows: dict[str, HealthRow] = {}
        self.stats: dict[State, tuple[int, int]] = {s: (0, 0) for s in State}
        self.pending: dict[tuple[PendingOp, PendingState], int] = {}
        self.repairs = (0, 0)  # (queued, retrying)
        self.error: Exception | None = None  # raised by health(): an unreadable index
        self.calls: list[tuple] = []

    def _keys(self, prefix: str, start: str, state: State) -> list[str]:
        return sorted((k for k, r in self.records.items()
                       if k.startswith(prefix) and k.encode() >= start.encode() and r.state is state),
                      key=str.encode)

    def list_keys(self, prefix: str, start: str, limit: int, state: State) -> tuple[list[str], str]:
        self.calls.append(("list_keys", prefix, start, limit, state))
        keys = self._keys(prefix, start, state)
        return keys[:limit], keys[limit] if len(keys) > limit else ""

    def health(self) -> dict[str, HealthRow]:
        if self.error is not None:
            raise self.error
        return dict(self.rows)

    def key_stats(self) -> dict[State, tuple[int, int]]:
        return dict(self.stats)

    def pending_stats(self) -> dict[tuple[PendingOp, PendingState], int]:
        return dict(self.pending)

    def repair_stats(self) -> tuple[int, int]:
        return self.repairs


class FakeWriter:
    """Store.writer: only ping() is the app's business."""

    def __init__(self) -> None:
        self.error: WriterError | None = None

    def ping(self) -> dict:
        if self.error is not None:
            raise self.error
        return {"pid": 4242, "commits": 7, "committed_ops": 9, "locks": 1}


class FakeStore:
    """What create_app calls on a Store: put, delete, unlink, locate, balanced, health,
    reader (list_keys, health) and writer.ping."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.records: dict[str, Record] = {}
        self.bodies: dict[str, bytes] = {}
        self.reader = FakeReader(self.records)
        self.writer = FakeWriter()
        self.ring = cfg.ring()
        self.volume_health: dict[str, Health] = {v: Health.UP for v in cfg.volumes}
        self.unbalanced: set[str] = set()
        self.fail: dict[str, BaseException] = {}
        self.calls: list[tuple] = []

    def _enter(self, op: str, *args: object) -> None:
        self.calls.append((op, *args))
        if op in self.fail:
            raise self.fail[op]

    def put(self, key: str, length: int | None, read: Callable[[int], bytes],
            content_md5: str | None) -> Record:
        self._enter("put", key, length, content_md5)
        parts, got = [], 0
        if length is None:  # chunked, as Store does: to its end, held to the limit
            while chunk := read(1 << 20):
                parts.append(chunk)
                got += len(chunk)
                if got > self.cfg.max_value_bytes:
                    raise TooLarge(f"more than the limit of {self.cfg.max_value_bytes} bytes")
            if not got:
                raise EmptyValue("empty value")
            length = got
        while got < length:  # as Store does: read to the announced length, or the client is gone
            chunk = read(length - got)
            if not chunk:
                raise ClientGone(f"body ended after {got} of {length} bytes")
            parts.append(chunk)
            got += len(chunk)
        body = b"".join(parts)
        md5 = hashlib.md5(body).hexdigest()
        if content_md5 is not None and content_md5.lower() != md5:
            raise BadDigest(f"Content-MD5 {content_md5} does not match the body's {md5}")
        current = self.records.get(key)
        if current is not None and current.state is State.LIVE:
            raise KeyExists(key)
        record = Record(key, State.LIVE, self.cfg.volumes, length, md5, 1.0)
        self.records[key], self.bodies[key] = record, body
        return record

    def delete(self, key: str) -> None:
        self._enter("delete", key)
        current = self.records.get(key)
        if current is None or current.state is State.DELETING:
            raise KeyMissing(key)
        if self.cfg.protect and current.state is not State.UNLINKED:
            raise Protected(key)
        del self.records[key]

    def unlink(self, key: str) -> None:
        self._enter("unlink", key)
        current = self.records.get(key)
        if current is None or current.state is not State.LIVE:
            raise KeyMissing(key)
        self.records[key] = dataclasses.replace(current, state=State.UNLINKED)

    def locate(self, key: str) -> tuple[core.ReadTarget, Record | None]:
        self._enter("locate", key)
        record = self.records.get(key)
        return core.read_target(key, record, self.health(), self.cfg.fallback), record

    def balanced(self, record: Record) -> bool:
        return record.key not in self.unbalanced

    def health(self) -> dict[str, Health]:
        return dict(self.volume_health)

    def writes(self) -> list[tuple]:
        """The store calls that change something."""
        return [c for c in self.calls if c[0] in ("put", "delete", "unlink")]


# --- the client -------------------------------------------------------------------------------


def as_gunicorn(app: Callable) -> Callable:
    """The environ gunicorn gives: RAW_URI is the request target as sent, query included
    (falcon.testing sets RAW_URI to the path alone and the query only in QUERY_STRING)."""

    def wsgi(env: dict, start_response: Callable) -> object:
        if env.get("QUERY_STRING"):
            env["RAW_URI"] = env["RAW_URI"] + "?" + env["QUERY_STRING"]
        return app(env, start_response)

    return wsgi


@pytest.fixture(autouse=True)
def wsgi_as_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """falcon.testing runs every request through wsgiref.validate, which wants a Content-Type
    on every answer but 204 and 304. HTTP wants one only on an answer with content, and a
    302 or a HEAD from the app has none. Every other check of the validator stays; the
    tests assert the Content-Type of every answer that has content themselves."""
    monkeypatch.setattr(wsgiref.validate, "check_content_type", lambda status, headers: None)


@pytest.fixture
def no_shared_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics from the in-process registry, as a process outside `mkv serve` has them."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def config(tmp_path: Path, **kw: object) -> Config:
    return Config(volumes=VOLUMES, db=str(tmp_path / "i.db"), **kw)


def client_for(cfg: Config, fake: FakeStore) -> TestClient:
    return TestClient(as_gunicorn(create_app(cfg, lambda: fake)))


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return config(tmp_path)


@pytest.fixture
def fake(cfg: Config) -> FakeStore:
    return FakeStore(cfg)


@pytest.fixture
def client(cfg: Config, fake: FakeStore) -> TestClient:
    return client_for(cfg, fake)


def assert_error(result: Result, status: int, error: str | None = None) -> dict:
    """`status`, and the JSON error body {"error", "detail"} (`error` named, if given)."""
    assert result.status_code == status, (result.status, result.content)
    assert result.headers.get("Content-Type", "").startswith("application/json"), result.headers
    doc = json.loads(result.content)
    assert set(doc) == {"error", "detail"}, doc
    assert isinstance(doc["error"], str) and doc["error"]
    assert isinstance(doc["detail"], str)
    if error is not None:
        assert doc["error"] == error, doc
    return doc


def assert_head_error(result: Result, status: int) -> None:
    """An error answer to HEAD: `status`, no body, Content-Length 0 (not the length of the
    JSON error a GET gets), no Content-Type."""
    assert result.status_code == status, (result.status, result.content)
    assert result.content == b""
    assert result.headers.get("Content-Length") == "0", result.headers
    assert "Content-Type" not in result.headers, result.headers


def blob(key: str) -> str:
    h = hashlib.sha256(key.encode()).hexdigest()
    return f"/{h[0:2]}/{h[2:4]}/{h}"


def stored(fake: FakeStore, key: str, body: bytes = b"value", state: State = State.LIVE) -> Record:
    """Put a record straight into the fake, as if written earlier."""
    record = Record(key, state, VOLUMES, len(body), hashlib.md5(body).hexdigest(), 1.0)
    fake.records[key], fake.bodies[key] = record, body
    return record


# --- create_app ---------------------------------------------------------------------------------


def test_the_store_is_asked_for_per_request_not_when_the_app_is_made(cfg: Config,
                                                                     fake: FakeStore) -> None:
    asked: list[int] = []

    def store() -> FakeStore:
        asked.append(1)
        return fake

    app = create_app(cfg, store)
    assert asked == []  # a worker builds its Store after the fork, on first use
    client = TestClient(as_gunicorn(app))
    client.simulate_get("/k")
    client.simulate_put("/k", body=b"v")
    assert len(asked) == 2


# --- PUT ----------------------------------------------------------------------------------------


def test_put_stores_the_body_and_answers_201(client: TestClient, fake: FakeStore) -> None:
    r = client.simulate_put("/dir/k%20ey", body=b"hello")
    assert r.status_code == 201
    assert r.content == b""
    assert fake.calls == [("put", "/dir/k ey", 5, None)]  # the key is the decoded path
    assert fake.bodies["/dir/k ey"] == b"hello"


def test_put_of_a_live_key_is_403(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/k", b"first")
    assert_error(client.simulate_put("/k", body=b"second"), 403, "key_exists")
    assert fake.bodies["/k"] == b"first"


def test_put_of_an_unlinked_key_is_201(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/k", b"first", State.UNLINKED)
    assert client.simulate_put("/k", body=b"second").status_code == 201
    assert fake.bodies["/k"] == b"second"


def chunked_put(client: TestClient, path: str, stream: object,
                headers: dict[str, str] | None = None) -> Result:
    """A PUT whose body is chunked: no CONTENT_LENGTH, the server's decoded stream as
    wsgi.input (read to its end)."""
    return client.simulate_request("PUT", path, headers={"Transfer-Encoding": "chunked",
                                                         **(headers or {})},
                                   extras={"wsgi.input": stream})


def test_put_without_a_content_length_or_a_chunked_body_is_411(client: TestClient,
                                                              fake: FakeStore) -> None:
    assert_error(client.simulate_put("/k"), 411, "length_required")  # no body, no length
    gzipped = chunked_put(client, "/k", io.BytesIO(b"abc"), {"Transfer-Encoding": "gzip, chunked"})
    assert_error(gzipped, 411, "length_required")
    assert fake.writes() == []


def test_a_chunked_put_reaches_the_store_without_a_length(client: TestClient,
                                                          fake: FakeStore) -> None:
    r = chunked_put(client, "/k", io.BytesIO(b"abc" * 1000))
    assert r.status_code == 201, r.content
    assert fake.writes() == [("put", "/k", None, None)]
    assert fake.bodies["/k"] == b"abc" * 1000


def test_an_empty_chunked_put_is_411(client: TestClient, fake: FakeStore) -> None:
    assert_error(chunked_put(client, "/k", io.BytesIO(b"")), 411, "length_required")
    assert "/k" not in fake.records


def test_a_chunked_put_over_max_value_bytes_is_413(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_value_bytes=10)
    fake = FakeStore(cfg)
    client = client_for(cfg, fake)
    assert_error(chunked_put(client, "/big", io.BytesIO(b"x" * 11)), 413, "too_large")
    assert "/big" not in fake.records
    assert chunked_put(client, "/big", io.BytesIO(b"x" * 10)).status_code == 201


class BadChunks(io.RawIOBase):
    """gunicorn's decoded body stream meeting a malformed chunk size line."""

    def read(self, n: int = -1) -> bytes:
        raise InvalidChunkSize(b"zz")


def test_a_malformed_chunked_body_is_400(client: TestClient, fake: FakeStore) -> None:
    assert_error(chunked_put(client, "/k", BadChunks()), 400, "incomplete_body")
    assert "/k" not in fake.records


def test_put_of_an_empty_body_is_411(client: TestClient, fake: FakeStore) -> None:
    assert_error(client.simulate_put("/k", headers={"Content-Length": "0"}), 411, "length_required")
    assert fake.writes() == []


def test_put_over_max_value_bytes_is_413(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_value_bytes=10)
    fake = FakeStore(cfg)
    client = client_for(cfg, fake)
    assert_error(client.simulate_put("/big", body=b"x" * 11), 413, "too_large")
    assert fake.writes() == []
    assert client.simulate_put("/big", body=b"x" * 10).status_code == 201


def test_put_with_a_wrong_content_md5_is_400(client: TestClient, fake: FakeStore) -> None:
    body = b"some value"
    wrong = hashlib.md5(body + b"!").hexdigest()
    r = client.simulate_put("/md5", body=body, headers={"Content-MD5": wrong})
    assert_error(r, 400, "bad_digest")
    assert "/md5" not in fake.records
    right = hashlib.md5(body).hexdigest()
    assert client.simulate_put("/md5", body=body, headers={"Content-MD5": right}).status_code == 201
    assert fake.calls[-1] == ("put", "/md5", len(body), right)  # the header reaches the store


def test_put_whose_body_ends_early_is_400(client: TestClient, fake: FakeStore) -> None:
    """The client announced 10 bytes and went away after 5."""
    r = client.simulate_put("/short", body=b"12345", headers={"Content-Length": "10"})
    assert_error(r, 400, "incomplete_body")
    assert "/short" not in fake.records


@pytest.mark.parametrize("op, method", [("put", "PUT"), ("delete", "DELETE"), ("unlink", "UNLINK")])
@pytest.mark.parametrize("exc, status, error", [
    (InFlight("/k"), 409, "write_in_flight"),
    (VolumeFailed("a:1: PUT /x: 500"), 502, "volume_failed"),
    (Unavailable("2 healthy failure domains, 3 needed"), 503, "unavailable"),
    (WriterUnavailable("no writer on the socket"), 503, "writer_unavailable"),
    (WriterError("io", "disk full"), 500, "writer_error"),
    (KeyLocked("/k"), 500, "writer_error"),  # the Store turns it into InFlight first
])
def test_store_errors_become_their_status(client: TestClient, fake: FakeStore, op: str,
                                          method: str, exc: Exception, status: int,
                                          error: str) -> None:
    stored(fake, "/k")
    fake.fail[op] = exc
    r = client.simulate_request(method, "/k", body=b"v" if method == "PUT" else None)
    doc = assert_error(r, status, error)
    assert doc["detail"] == str(exc)
    assert [c[0] for c in fake.writes()] == [op]


# --- keys that cannot be keys -------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/long/" + "k" * 1019,            # 1025 bytes
    "/long/" + "%C3%A9" * 510,        # 1026 bytes once decoded
    "/ctl/a%01b", "/ctl/a%7Fb", "/ctl/a%0Ab", "/ctl/%00",
    "/utf8/%FF", "/utf8/%C3%28", "/utf8/%ED%A0%80",
    "/",
])
@pytest.mark.parametrize("method", ["PUT", "GET", "HEAD", "DELETE", "UNLINK"])
def test_bad_keys_are_400(client: TestClient, fake: FakeStore, path: str, method: str) -> None:
    r = client.simulate_request(method, path, body=b"v" if method == "PUT" else None)
    if method == "HEAD":
        assert_head_error(r, 400)
    else:
        assert_error(r, 400, "bad_key")
    assert fake.calls == []


def test_the_longest_key_is_counted_in_decoded_utf8_bytes(client: TestClient,
                                                          fake: FakeStore) -> None:
    longest = "/ok/" + "k" * (1024 - 4)
    assert client.simulate_put(longest, body=b"v").status_code == 201
    wide = "/w/" + "é" * 510  # 1023 bytes, 3063 characters on the wire
    assert client.simulate_put(quote(wide), body=b"v").status_code == 201
    assert set(fake.records) == {longest, wide}
    assert_error(client.simulate_put(longest + "x", body=b"v"), 400, "bad_key")


def test_a_list_prefix_is_checked_like_a_key(client: TestClient, fake: FakeStore) -> None:
    assert_error(client.simulate_get("/ctl/%01/?list"), 400, "bad_key")
    assert fake.reader.calls == []


# --- GET and HEAD -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_get_and_head_redirect_to_a_replica_with_the_key_headers(client: TestClient,
                                                                 fake: FakeStore,
                                                                 method: str) -> None:
    record = stored(fake, "/dir/k ey", b"the value")
    r = client.simulate_request(method, "/dir/k%20ey")
    assert r.status_code == 302
    # the other replicas, for the volume to fail over to (docs/design.md, "Read failover")
    assert r.headers["Location"] == f"http://a:1{blob('/dir/k ey')}?next=b:2,c:3"
    assert r.headers["Content-Md5"] == record.md5 == hashlib.md5(b"the value").hexdigest()
    assert r.headers["Key-Volumes"] == "a:1,b:2,c:3"
    assert r.headers["Key-Balance"] == "balanced"
    assert r.content == b""
    assert fake.calls == [("locate", "/dir/k ey")]


def test_key_balance_says_unbalanced(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/k")
    fake.unbalanced.add("/k")
    assert client.simulate_get("/k").headers["Key-Balance"] == "unbalanced"


def test_a_read_skips_a_replica_on_a_down_volume(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/k")
    fake.volume_health["a:1"] = Health.DOWN
    r = client.simulate_get("/k")
    # nor is it a hop to fail over to
    assert r.status_code == 302 and r.headers["Location"] == f"http://b:2{blob('/k')}?next=c:3"


def test_get_of_a_missing_key_is_404(client: TestClient, fake: FakeStore) -> None:
    doc = assert_error(client.simulate_get("/missing"), 404, "not_found")
    assert doc["detail"] == "/missing"
    assert_head_error(client.simulate_head("/missing"), 404)


@pytest.mark.parametrize("state", [State.UNLINKED, State.DELETING])
def test_get_of_a_key_that_is_not_live_is_404(client: TestClient, fake: FakeStore,
                                              state: State) -> None:
    stored(fake, "/k", state=state)
    assert_error(client.simulate_get("/k"), 404, "not_found")


def test_get_when_every_replica_is_down_is_503(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/k")
    fake.volume_health = {v: Health.DOWN for v in VOLUMES}
    assert_error(client.simulate_get("/k"), 503, "unavailable")
    assert_head_error(client.simulate_head("/k"), 503)


def test_get_of_a_missing_key_goes_to_the_fallback(tmp_path: Path) -> None:
    cfg = config(tmp_path, fallback="old:9")
    fake = FakeStore(cfg)
    client = client_for(cfg, fake)
    r = client.simulate_get("/with%20space")
    assert r.status_code == 302
    assert r.headers["Location"] == "http://old:9/with%20space"
    assert "Content-Md5" not in r.headers and "Key-Volumes" not in r.headers
    stored(fake, "/here")
    assert client.simulate_get("/here").headers["Location"].startswith("http://a:1/")


def test_a_store_that_breaks_on_a_read_is_500_with_json(client: TestClient, fake: FakeStore,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    fake.fail["locate"] = RuntimeError("index is gone")
    assert_error(client.simulate_get("/k"), 500, "internal")
    assert "unhandled error" in caplog.text


# --- DELETE and UNLINK --------------------------------------------------------------------------


def test_delete_is_204_then_404(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/k")
    r = client.simulate_delete("/k")
    assert r.status_code == 204 and r.content == b""
    assert "/k" not in fake.records
    assert_error(client.simulate_delete("/k"), 404, "not_found")
    assert_error(client.simulate_delete("/never"), 404, "not_found")


def test_delete_of_a_protected_key_is_403_until_it_is_unlinked(tmp_path: Path) -> None:
    cfg = config(tmp_path, protect=True)
    fake = FakeStore(cfg)
    client = client_for(cfg, fake)
    stored(fake, "/k")
    assert_error(client.simulate_delete("/k"), 403, "protected")
    assert "/k" in fake.records
    assert client.simulate_request("UNLINK", "/k").status_code == 204
    assert client.simulate_delete("/k").status_code == 204
    assert "/k" not in fake.records


def test_unlink_is_204_then_404(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/k")
    r = client.simulate_request("UNLINK", "/k")
    assert r.status_code == 204 and r.content == b""
    assert fake.records["/k"].state is State.UNLINKED
    assert_error(client.simulate_get("/k"), 404, "not_found")
    assert_error(client.simulate_request("UNLINK", "/k"), 404, "not_found")
    assert_error(client.simulate_request("UNLINK", "/never"), 404, "not_found")


# --- listings -----------------------------------------------------------------------------------


def test_list_answers_every_live_key_under_the_prefix(client: TestClient, fake: FakeStore) -> None:
    inside = ["/p/b", "/p/a", "/p/ключ", "/p/c"]
    for key in inside + ["/p", "/pa/x", "/q/p/"]:
        stored(fake, key)
    stored(fake, "/p/gone", state=State.UNLINKED)
    r = client.simulate_get("/p/?list")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json == {"next": "", "keys": sorted(inside, key=str.encode)}
    assert fake.reader.calls == [("list_keys", "/p/", "", 10_000, State.LIVE)]


def test_list_of_an_empty_prefix_is_an_empty_list(client: TestClient) -> None:
    assert client.simulate_get("/nothing/?list").json == {"next": "", "keys": []}


def test_the_bare_prefix_lists_everything(client: TestClient, fake: FakeStore) -> None:
    for key in ("/a", "/b/c", "/z"):
        stored(fake, key)
    assert client.simulate_get("/?list").json == {"next": "", "keys": ["/a", "/b/c", "/z"]}


def test_list_pages_with_limit_and_start(client: TestClient, fake: FakeStore) -> None:
    keys = [f"/p/{i:02d}" for i in range(5)]
    for key in keys:
        stored(fake, key)
    seen, start, pages = [], "", 0
    while True:
        r = client.simulate_get("/p/?list&limit=2" + (f"&start={quote(start, safe='')}" if start else ""))
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
        doc = r.json
        assert set(doc) == {"next", "keys"} and len(doc["keys"]) <= 2
        seen += doc["keys"]
        pages += 1
        start = doc["next"]
        if not start:
            break
    assert seen == keys and pages == 3
    assert fake.reader.calls == [("list_keys", "/p/", "", 2, State.LIVE),
                                 ("list_keys", "/p/", "/p/02", 2, State.LIVE),
                                 ("list_keys", "/p/", "/p/04", 2, State.LIVE)]


def test_unlinked_lists_only_unlinked_keys(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/u/live")
    stored(fake, "/u/a", state=State.UNLINKED)
    stored(fake, "/u/b", state=State.UNLINKED)
    assert client.simulate_get("/u/?unlinked").json == {"next": "", "keys": ["/u/a", "/u/b"]}
    assert client.simulate_get("/u/?unlinked&limit=1").json == {"next": "/u/b", "keys": ["/u/a"]}
    assert fake.reader.calls == [("list_keys", "/u/", "", 10_000, State.UNLINKED),
                                 ("list_keys", "/u/", "", 1, State.UNLINKED)]


def test_a_page_never_exceeds_max_list_limit(tmp_path: Path, fake: FakeStore) -> None:
    client = client_for(config(tmp_path, max_list_limit=3), fake)
    keys = [f"/m/{i}" for i in range(7)]
    for key in keys:
        stored(fake, key)
    # no limit: a page of max-list-limit and a next, not the whole prefix
    assert client.simulate_get("/m/?list").json == {"next": "/m/3", "keys": keys[:3]}
    # a larger limit is capped, a smaller one kept
    doc = client.simulate_get("/m/?list&limit=100&start=/m/3").json
    assert doc == {"next": "/m/6", "keys": keys[3:6]}
    assert client.simulate_get("/m/?list&limit=2").json == {"next": "/m/2", "keys": keys[:2]}


def test_listings_over_the_rate_get_429_with_retry_after(tmp_path: Path, fake: FakeStore) -> None:
    client = client_for(config(tmp_path, list_rate=0.5, list_burst=2), fake)
    stored(fake, "/r/k")
    stored(fake, "/other")
    answers = [client.simulate_get("/r/?list") for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 429, 429]
    limited = answers[2]
    assert limited.json["error"] == "rate_limited"
    assert limited.headers["Content-Type"].startswith("application/json")
    assert 1 <= int(limited.headers["Retry-After"]) <= 2  # a token every 2 s
    assert client.simulate_get("/u/?unlinked").status_code == 429  # the same bucket
    # key requests never meet the bucket
    assert client.simulate_get("/other").status_code == 302
    assert client.simulate_put("/r/new", body=b"v").status_code == 201


def test_list_rate_0_is_no_limit(tmp_path: Path, fake: FakeStore) -> None:
    client = client_for(config(tmp_path, list_rate=0, list_burst=1), fake)
    assert all(client.simulate_get("/?list").status_code == 200 for _ in range(50))


@pytest.mark.parametrize("target", [
    "/p/?list&limit=abc", "/p/?list&limit=0", "/p/?list&limit=-1", "/p/?list&limit=",
    "/p/?list&limit=1.5", "/p/?list&limit=%EF%BC%91",  # a full-width digit one
    "/p/?list&bogus=1", "/p/?list&unlinked", "/p/?list&list", "/p/?start=a",
    "/somekey?foo=bar", "/p/?list&start=%FF",
])
def test_bad_queries_are_400(client: TestClient, fake: FakeStore, target: str) -> None:
    assert_error(client.simulate_get(target), 400, "bad_query")
    assert fake.calls == [] and fake.reader.calls == []


@pytest.mark.parametrize("method, target", [
    ("PUT", "/lp/?list"), ("PUT", "/lp/key?x=1"), ("PUT", "/lp/key?list"),
    ("DELETE", "/lp/key?list"), ("UNLINK", "/lp/?unlinked"),
])
def test_a_query_on_a_write_is_400_and_writes_nothing(client: TestClient, fake: FakeStore,
                                                      method: str, target: str) -> None:
    r = client.simulate_request(method, target, body=b"x" if method == "PUT" else None)
    assert_error(r, 400, "bad_query")
    assert fake.calls == [] and fake.reader.calls == []


def test_an_empty_query_is_no_query(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/k")
    client_env = {"RAW_URI": "/k?"}  # what gunicorn passes for GET /k?
    assert client.simulate_get("/k", extras=client_env).status_code == 302


# --- methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PATCH", "POST", "FOO", "OPTIONS", "PROPFIND"])
def test_unknown_methods_are_405_with_allow(client: TestClient, fake: FakeStore,
                                            method: str) -> None:
    r = client.simulate_request(method, "/m/key", body=b"x")
    assert_error(r, 405, "method_not_allowed")
    allowed = {m.strip() for m in r.headers["Allow"].split(",")}
    assert allowed == set(KEY_METHODS) == {"GET", "HEAD", "PUT", "DELETE", "UNLINK"}
    assert fake.calls == []


# --- /-/health and /-/metrics -------------------------------------------------------------------


def test_health_is_200_when_writes_can_be_taken(client: TestClient, fake: FakeStore) -> None:
    fake.reader.rows = {"a:1": HealthRow("a:1", True, 100.0, 50.0, 1.5, None),
                        "b:2": HealthRow("b:2", True, 101.0, 51.0, 2.5, None)}
    r = client.simulate_get("/-/health")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    doc = r.json
    assert doc["status"] == "ok" and doc["replicas"] == 3 and isinstance(doc["pid"], int)
    assert doc["readable"] is True and doc["writable"] is True
    assert doc["index"] == {"readable": True}
    assert doc["writer"] == {"up": True, "pid": 4242, "commits": 7, "committed_ops": 9,
                             "locks": 1}
    # three volumes, three replicas: each holds a copy of every key, a third of all copies
    placement = {"weight": 1.0, "zone": None, "share": 0.3333}
    assert doc["volumes"] == [
        {"volume": "a:1", "host": "a:1", **placement, "up": True, "status": "up", "since": 50.0,
         "checked": 100.0, "latency_ms": 1.5, "error": None},
        {"volume": "b:2", "host": "b:2", **placement, "up": True, "status": "up", "since": 51.0,
         "checked": 101.0, "latency_ms": 2.5, "error": None},
        {"volume": "c:3", "host": "c:3", **placement, "up": True, "status": "up", "since": None,
         "checked": None, "latency_ms": None, "error": None},
    ]
    assert client.simulate_head("/-/health").status_code == 200
    assert client.simulate_get("/-/health", query_string="writable").status_code == 200
    assert client.simulate_head("/-/health", query_string="writable").status_code == 200


def test_health_counts_an_unknown_volume_as_usable(client: TestClient, fake: FakeStore) -> None:
    fake.volume_health = {}
    r = client.simulate_get("/-/health")
    assert r.status_code == 200 and r.json["writable"] is True
    assert [(v["up"], v["status"]) for v in r.json["volumes"]] == [(True, "unknown")] * 3


def test_health_is_200_for_reads_when_a_volume_down_stops_writes(client: TestClient,
                                                                 fake: FakeStore) -> None:
    fake.volume_health["b:2"] = Health.DOWN
    fake.reader.rows = {"b:2": HealthRow("b:2", False, 100.0, 90.0, None, "timed out")}
    r = client.simulate_get("/-/health")
    assert r.status_code == 200
    doc = r.json
    assert doc["status"] == "degraded" and doc["writer"]["up"] is True
    assert doc["readable"] is True and doc["writable"] is False
    down = [v for v in doc["volumes"] if not v["up"]]
    assert down == [{"volume": "b:2", "weight": 1.0, "zone": None, "host": "b:2", "share": 0.3333,
                     "up": False, "status": "down", "since": 90.0, "checked": 100.0,
                     "latency_ms": None, "error": "timed out"}]
    w = client.simulate_get("/-/health", query_string="writable")
    assert w.status_code == 503 and w.json == doc | {"pid": w.json["pid"]}
    assert_head_error(client.simulate_head("/-/health", query_string="writable"), 503)
    # a HEAD that succeeds still announces what a GET would send
    head = client.simulate_head("/-/health")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(client.simulate_get("/-/health").content))


def test_health_shows_a_replaced_volume_as_up_and_writable(client: TestClient,
                                                          fake: FakeStore) -> None:
    fake.volume_health["a:1"] = Health.REPLACED
    r = client.simulate_get("/-/health")
    assert r.status_code == 200 and r.json["writable"] is True
    assert [(v["volume"], v["up"], v["status"]) for v in r.json["volumes"]][0] == (
        "a:1", True, "replaced")


def test_health_is_200_for_reads_when_the_writer_does_not_answer(client: TestClient,
                                                                 fake: FakeStore) -> None:
    fake.writer.error = WriterUnavailable("no writer on the socket")
    r = client.simulate_get("/-/health")
    assert r.status_code == 200
    assert r.json["status"] == "degraded" and r.json["writable"] is False
    assert r.json["writer"] == {"up": False, "error": "unavailable: no writer on the socket"}
    assert client.simulate_get("/-/health", query_string="writable").status_code == 503


def test_health_is_503_when_every_volume_is_down(client: TestClient, fake: FakeStore) -> None:
    fake.volume_health = {v: Health.DOWN for v in VOLUMES}
    r = client.simulate_get("/-/health")
    assert r.status_code == 503
    assert r.json["status"] == "unavailable"
    assert r.json["readable"] is False and r.json["writable"] is False
    assert r.json["index"] == {"readable": True}
    assert client.simulate_get("/-/health", query_string="writable").status_code == 503


def test_health_is_503_when_the_index_cannot_be_read(client: TestClient, fake: FakeStore) -> None:
    fake.reader.error = apsw.CantOpenError("unable to open database file")
    r = client.simulate_get("/-/health")
    assert r.status_code == 503
    assert r.json["status"] == "unavailable" and r.json["readable"] is False
    assert r.json["index"] == {"readable": False, "error": "unable to open database file"}
    assert r.json["writer"]["up"] is True  # still said, for the operator
    assert [v["status"] for v in r.json["volumes"]] == ["unknown"] * 3


@pytest.mark.parametrize("query", ["writeable", "writable=1", "writable&x", "list"])
def test_health_refuses_a_query_it_does_not_know(client: TestClient, query: str) -> None:
    assert_error(client.simulate_get("/-/health", query_string=query), 400, "bad_query")


def count(method: str, status: int) -> float:
    return REGISTRY.get_sample_value("mkv_requests_total",
                                     {"method": method, "status": str(status)}) or 0.0


def timed(method: str) -> float:
    return REGISTRY.get_sample_value("mkv_request_seconds_count", {"method": method}) or 0.0


def test_metrics_are_text_and_count_answers(client: TestClient, fake: FakeStore,
                                            no_shared_metrics: None) -> None:
    wanted = [("PUT", 201), ("GET", 302), ("GET", 404), ("DELETE", 404), ("OTHER", 405)]
    before = {k: count(*k) for k in wanted}
    timed_before = {m: timed(m) for m in ("PUT", "GET", "DELETE", "OTHER")}
    client.simulate_put("/metrics/k", body=b"v")
    client.simulate_get("/metrics/k")
    client.simulate_get("/metrics/k")
    client.simulate_get("/metrics/missing")
    client.simulate_delete("/metrics/missing")
    client.simulate_request("PATCH", "/metrics/k")
    grown = {k: count(*k) - before[k] for k in wanted}
    assert grown == {("PUT", 201): 1, ("GET", 302): 2, ("GET", 404): 1, ("DELETE", 404): 1,
                     ("OTHER", 405): 1}
    # every method is timed, reads too
    assert {m: timed(m) - n for m, n in timed_before.items()} == {"PUT": 1, "GET": 3, "DELETE": 1,
                                                                  "OTHER": 1}

    r = client.simulate_get("/-/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    assert 'mkv_requests_total{method="PUT",status="201"}' in r.text


def test_metrics_say_what_the_index_counts(client: TestClient, fake: FakeStore,
                                           no_shared_metrics: None) -> None:
    now = time.time()
    fake.reader.rows = {"a:1": HealthRow("a:1", True, now, 50.0, 1.5, None, replaced=True),
                        "b:2": HealthRow("b:2", False, now, 51.0, 250.0, "timed out"),
                        "c:3": HealthRow("c:3", True, now - 3600, 51.0, 2.0, None)}  # stale
    fake.reader.stats = {State.LIVE: (3, 300), State.UNLINKED: (1, 7), State.DELETING: (2, 9)}
    fake.reader.pending = {(PendingOp.REMOVE, PendingState.DUE): 4,
                           (PendingOp.MARK_UNLINKED, PendingState.INTENT): 0}
    fake.reader.repairs = (5, 2)
    r = client.simulate_get("/-/metrics")
    assert r.status_code == 200
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(r.text) for s in f.samples
           if s.name.startswith(("mkv_volume_", "mkv_stored_", "mkv_pending_", "mkv_repair_queue"))
           and not s.name.startswith(("mkv_volume_requests", "mkv_volume_errors"))}
    ages = {k: v for k, v in got.items() if k[0] == "mkv_volume_health_age_seconds"}
    assert set(ages) == {("mkv_volume_health_age_seconds", (("volume", v),)) for v in VOLUMES}
    assert ages[("mkv_volume_health_age_seconds", (("volume", "c:3"),))] >= 3600
    assert {k: v for k, v in got.items() if k not in ages} == {
        ("mkv_volume_up", (("volume", "a:1"),)): 1.0,  # replaced, and up
        ("mkv_volume_up", (("volume", "b:2"),)): 0.0,  # c:3's status is unknown: no sample
        ("mkv_volume_replaced", (("volume", "a:1"),)): 1.0,
        ("mkv_volume_replaced", (("volume", "b:2"),)): 0.0,
        ("mkv_repair_queue", (("state", "waiting"),)): 3.0,
        ("mkv_repair_queue", (("state", "retrying"),)): 2.0,
        ("mkv_volume_probe_seconds", (("volume", "a:1"),)): 0.0015,
        ("mkv_volume_probe_seconds", (("volume", "b:2"),)): 0.25,
        ("mkv_stored_keys", (("state", "live"),)): 3.0,
        ("mkv_stored_keys", (("state", "unlinked"),)): 1.0,
        ("mkv_stored_keys", (("state", "deleting"),)): 2.0,
        ("mkv_stored_bytes", (("state", "live"),)): 300.0,
        ("mkv_stored_bytes", (("state", "unlinked"),)): 7.0,
        ("mkv_stored_bytes", (("state", "deleting"),)): 9.0,
        ("mkv_pending_operations", (("op", "remove"), ("state", "due"))): 4.0,
        ("mkv_pending_operations", (("op", "mark_unlinked"), ("state", "intent"))): 0.0,
    }


def test_metrics_answer_without_the_index(client: TestClient, fake: FakeStore,
                                          no_shared_metrics: None) -> None:
    fake.reader.error = apsw.CantOpenError("unable to open database file")
    r = client.simulate_get("/-/metrics")
    assert r.status_code == 200
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert "mkv_requests" in names and "mkv_volume_up" not in names and "mkv_stored_keys" not in names


# --- uniform answers ----------------------------------------------------------------------------


def test_empty_201_and_204_answers_carry_no_content_type(client: TestClient, fake: FakeStore) -> None:
    put = client.simulate_put("/empty/k", body=b"v")
    assert put.status_code == 201 and put.content == b"" and "Content-Type" not in put.headers
    unlink = client.simulate_request("UNLINK", "/empty/k")
    assert unlink.status_code == 204 and "Content-Type" not in unlink.headers
    delete = client.simulate_delete("/empty/k")
    assert delete.status_code == 204 and "Content-Type" not in delete.headers


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST"])
def test_the_frameworks_own_errors_have_the_error_shape(client: TestClient, method: str) -> None:
    r = client.simulate_request(method, "/-/health", body=b"x")
    assert_error(r, 405)
    assert "GET" in r.headers["Allow"]
    # a method the framework does not know at all on a route of its own
    assert_error(client.simulate_request("UNLINK", "/-/health"), 400)


@pytest.mark.parametrize("path", ["/-/ping", "/-/anything", "/-/health/x", "/-/"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
def test_unknown_service_paths_are_404(client: TestClient, fake: FakeStore, path: str,
                                       method: str) -> None:
    r = client.simulate_request(method, path, body=b"x" if method == "PUT" else None)
    if method == "HEAD":
        assert_head_error(r, 404)
    else:
        assert_error(r, 404, "not_found")
    assert fake.calls == []


@pytest.mark.parametrize("limit", ["99999999999999999999", str(1 << 63)])
def test_a_limit_beyond_64_bits_is_400(client: TestClient, limit: str) -> None:
    assert_error(client.simulate_get("/p/", query_string=f"list&limit={limit}"), 400, "bad_query")


def test_a_key_with_scheme_like_text_is_its_own_key(client: TestClient, fake: FakeStore) -> None:
    stored(fake, "/victim", b"theirs")
    r = client.simulate_put("/public/x://y/victim", body=b"mine",
                            extras={"RAW_URI": "/public/x://y/victim"})
    assert r.status_code == 201
    assert fake.bodies["/public/x://y/victim"] == b"mine" and fake.bodies["/victim"] == b"theirs"
    r = client.simulate_delete("/public/x://y/victim", extras={"RAW_URI": "/public/x://y/victim"})
    assert r.status_code == 204 and "/victim" in fake.records


def test_a_store_error_nobody_mapped_is_counted_as_the_500_it_is(client: TestClient, fake: FakeStore,
                                                                 no_shared_metrics: None) -> None:
    fake.fail["put"] = RuntimeError("surprise")
    before = count("PUT", 500), count("PUT", 200)
    assert_error(client.simulate_put("/boom/k", body=b"v"), 500, "internal")
    assert (count("PUT", 500), count("PUT", 200)) == (before[0] + 1, before[1])


# --- tokens -------------------------------------------------------------------------------------

TOKEN = "t0ken-for-the-app-tests"


def token_client(tmp_path: Path, **kw: object) -> tuple[TestClient, FakeStore]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# writers\n{TOKEN}\n")
    cfg = config(tmp_path, api_tokens_file=str(tokens), **kw)
    fake = FakeStore(cfg)
    return client_for(cfg, fake), fake


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("method", ["PUT", "DELETE", "UNLINK"])
def test_writes_need_a_token(tmp_path: Path, method: str) -> None:
    client, fake = token_client(tmp_path)
    stored(fake, "/t/k")
    body = b"v" if method == "PUT" else None
    r = client.simulate_request(method, "/t/new" if method == "PUT" else "/t/k", body=body)
    assert_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = client.simulate_request(method, "/t/k", body=body, headers=bearer(TOKEN + "x"))
    assert_error(r, 403, "forbidden")
    assert fake.writes() == [] and fake.calls == []
    r = client.simulate_request(method, "/t/new" if method == "PUT" else "/t/k", body=body,
                                headers=bearer(TOKEN))
    assert r.status_code == (201 if method == "PUT" else 204)


def test_every_error_answer_to_head_has_no_length(tmp_path: Path) -> None:
    """From the fast read path and from the framework alike: a bad query, a bad method
    on /-/metrics, a missing token (which keeps its WWW-Authenticate)."""
    client, fake = token_client(tmp_path, auth_reads=True)
    auth = bearer(TOKEN)
    assert_head_error(client.simulate_head("/p/", query_string="list&limit=x", headers=auth), 400)
    assert_head_error(client.simulate_head("/p/", query_string="bogus", headers=auth), 400)
    assert_head_error(client.simulate_head("/-/metrics", headers=auth), 405)
    for path, query in (("/t/k", None), ("/t/", "list")):
        r = client.simulate_head(path, query_string=query)
        assert_head_error(r, 401)
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_head_error(client.simulate_head("/t/missing", headers=auth), 404)
    assert_head_error(client.simulate_head("/t/missing", headers=bearer("nope-nope-nope-nope")),
                      403)


def test_without_auth_reads_reads_stay_open(tmp_path: Path) -> None:
    client, fake = token_client(tmp_path)
    stored(fake, "/t/k")
    assert client.simulate_get("/t/k").status_code == 302
    assert client.simulate_head("/t/k").status_code == 302
    assert client.simulate_get("/t/?list").status_code == 200


def test_auth_reads_closes_get_head_and_listings(tmp_path: Path) -> None:
    client, fake = token_client(tmp_path, auth_reads=True)
    stored(fake, "/t/k")
    for method, path in (("GET", "/t/k"), ("HEAD", "/t/k"), ("GET", "/t/?list"),
                         ("GET", "/t/?unlinked"), ("GET", "/nothing")):
        r = client.simulate_request(method, path)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (method, path)
        r = client.simulate_request(method, path, headers=bearer("nope-nope-nope-nope"))
        assert r.status_code == 403, (method, path)
    assert client.simulate_get("/t/k", headers=bearer(TOKEN)).status_code == 302
    assert client.simulate_get("/t/?list", headers=bearer(TOKEN)).json["keys"] == ["/t/k"]
    assert client.simulate_get("/-/health").status_code == 200  # for the load balancer


def test_a_tokens_file_gone_when_a_worker_starts_lets_no_write_through(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    cfg = config(tmp_path, api_tokens_file=str(tokens))
    tokens.unlink()
    client = client_for(cfg, FakeStore(cfg))
    assert_error(client.simulate_put("/t/k", body=b"v", headers=bearer(TOKEN)), 403, "forbidden")

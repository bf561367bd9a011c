"""mkv.client against a live cluster: real nginx volumes and a real `mkv serve`, no mocks.

Every method on the module's shared service; paging, protect and limits on a strict one;
tokens on one with an `api-tokens-file`. The retries are driven by real faults: volumes
stopped and started again (503), a write in flight holding the key's lock (409), and a
relay that drops the service's answer to a PUT that was stored (an unknown outcome).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from mkv.client import (
    BadRequest,
    BlobReader,
    Client,
    Conflict,
    Forbidden,
    KeyExists,
    MkvError,
    NotFound,
    Protected,
    TooLarge,
    Unauthorized,
    Unavailable,
    key_path,
)
from mkv.service.store import HEALTH_CACHE_SECONDS
from tests.cluster import NginxVolume
from tests.helpers import (
    FAST_HEALTH,
    TIMEOUT,
    Relay,
    SlowBody,
    health_locks,
    index_record,
    kurl,
    read,
    volume_status,
    wait_until,
)
from tests.service import MkvService

MiB = 1 << 20
TOKEN = "client-test-token-0123456789"


@pytest.fixture(scope="module")
def mkv(shared_service: MkvService) -> Iterator[Client]:
    with Client(shared_service.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def strict(shared_volumes: list[NginxVolume],
           start_shared_service: Callable[..., MkvService]) -> MkvService:
    """Pages of at most 5 keys, values of at most 16 KiB, DELETE only after UNLINK.

    (A value refused by its Content-Length is answered before its body is read; gunicorn
    reads what is left up to 64 KiB before closing, so the client always sees the 413 of
    a value that exceeds the limit by less. Beyond that, an HTTP/1.1 client still sending
    may get a reset instead of the answer.)"""
    return start_shared_service(shared_volumes, extra=[
        "--max-list-limit", "5", "--max-value-bytes", str(16 * 1024), "--protect", "true"])


@pytest.fixture(scope="module")
def guarded(shared_volumes: list[NginxVolume], start_shared_service: Callable[..., MkvService],
            tmp_path_factory: pytest.TempPathFactory) -> MkvService:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(TOKEN + "\n")
    return start_shared_service(shared_volumes, extra=["--api-tokens-file", str(tokens)])


class Retries(logging.Handler):
    """The client's retry lines (logger mkv.client), with an event set at the first."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.first = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.first.set()


@pytest.fixture
def retries() -> Iterator[Retries]:
    handler = Retries()
    logger = logging.getLogger("mkv.client")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield handler
    logger.removeHandler(handler)


# --- every method --------------------------------------------------------------------------------


def test_put_get_stat_delete(mkv: Client, shared_service: MkvService,
                             shared_volumes: list[NginxVolume]) -> None:
    key = "/client/basic"
    data = os.urandom(300_000)
    mkv.put(key, data)
    assert mkv.get(key) == data
    st = mkv.stat(key)
    assert (st.key, st.size, st.md5) == (key, len(data), hashlib.md5(data).hexdigest())
    assert set(st.volumes) == {v.address for v in shared_volumes}
    assert st.url.startswith("http://127.0.0.1:")
    assert index_record(shared_service, key).size == len(data)

    mkv.delete(key)
    with pytest.raises(NotFound) as missing:
        mkv.get(key)
    assert missing.value.status == 404 and missing.value.error == "not_found"
    with pytest.raises(NotFound):
        mkv.stat(key)  # from a HEAD: no body, the status decides
    with pytest.raises(NotFound):
        mkv.delete(key)


def test_a_live_key_is_never_overwritten(mkv: Client) -> None:
    mkv.put("/client/once", b"first")
    for value in (b"second", b"first"):  # the same bytes too: a first attempt, not a retry
        with pytest.raises(KeyExists) as exists:
            mkv.put("/client/once", value)
        assert exists.value.status == 403 and exists.value.error == "key_exists"
    assert mkv.get("/client/once") == b"first"


def test_put_of_a_file_streams_it_from_where_it_stands(mkv: Client, tmp_path: Path,
                                                       shared_service: MkvService) -> None:
    data = os.urandom(3 * MiB + 11)
    path = tmp_path / "value.bin"
    path.write_bytes(data)
    with path.open("rb") as f:
        f.seek(1000)
        mkv.put("/client/file", f)
    assert read(shared_service, "/client/file") == data[1000:]
    assert mkv.stat("/client/file").md5 == hashlib.md5(data[1000:]).hexdigest()


def test_put_of_a_pipe_and_of_a_generator_goes_chunked(mkv: Client,
                                                       shared_service: MkvService) -> None:
    data = os.urandom(2 * MiB + 3)
    with subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as cat:
        feeder = threading.Thread(target=lambda: (cat.stdin.write(data), cat.stdin.close()))
        feeder.start()
        mkv.put("/client/pipe", cat.stdout)  # not seekable: chunked
        feeder.join(TIMEOUT)
    assert read(shared_service, "/client/pipe") == data

    parts = [os.urandom(n) for n in (10, 0, 700_000, 1, 900_000)]  # an empty chunk, skipped
    mkv.put("/client/gen", (p for p in parts))
    assert mkv.get("/client/gen") == b"".join(parts)
    assert mkv.stat("/client/gen").size == sum(map(len, parts))


def test_values_that_are_not_bytes_are_refused_before_sending(mkv: Client,
                                                              tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        mkv.put("/client/str", "text")
    (tmp_path / "t.txt").write_text("text")
    with (tmp_path / "t.txt").open() as f, pytest.raises(TypeError):
        mkv.put("/client/text-file", f)
    with pytest.raises(TypeError):
        mkv.put("/client/str-chunks", iter(["a", "b"]))
    with pytest.raises(NotFound):
        mkv.stat("/client/str-chunks")


def test_open_reads_with_ranges_and_seeks(mkv: Client, shared_volumes: list[NginxVolume]) -> None:
    key = "/client/open"
    data = os.urandom(3 * MiB + 5)
    mkv.put(key, data)
    with mkv.open(key) as f:
        assert isinstance(f, BlobReader) and isinstance(f, io.RawIOBase)
        assert f.size == len(data) and f.md5 == hashlib.md5(data).hexdigest()
        assert f.readable() and f.seekable() and not f.writable()
        assert f.read(10) == data[:10] and f.tell() == 10
        assert f.read(MiB) == data[10:10 + MiB]  # one streamed GET, read on
        assert f.seek(2 * MiB) == 2 * MiB
        assert f.read(100) == data[2 * MiB:2 * MiB + 100]
        assert f.seek(-50, os.SEEK_END) == len(data) - 50
        assert f.read() == data[-50:]
        assert f.read(10) == b"" and f.tell() == len(data)
        assert f.seek(-10, os.SEEK_CUR) == len(data) - 10
        buf = bytearray(20)
        assert f.readinto(buf) == 10 and bytes(buf[:10]) == data[-10:]
        f.seek(7)
        assert f.read() == data[7:]
    assert f.closed
    with pytest.raises(ValueError):
        f.read(1)
    # the volumes saw Range requests (206 answers) for the blob the service redirected to
    blob = urlsplit(mkv.stat(key).url).path.rsplit("/", 1)[-1]  # the query names other hops

    def ranged() -> int:
        return sum(1 for v in shared_volumes for line in v.access_lines()
                   if blob in line and '" 206 ' in line)
    wait_until(lambda: ranged() >= 4, TIMEOUT, "the volumes' 206 answers in their access logs")


def test_open_of_a_missing_key_is_not_found(mkv: Client) -> None:
    with pytest.raises(NotFound):
        mkv.open("/client/no-such-key")


def test_unlink_hides_a_key_and_lists_it_as_unlinked(mkv: Client) -> None:
    mkv.put("/client/unl/a", b"a")
    mkv.put("/client/unl/b", b"b")
    mkv.unlink("/client/unl/a")
    with pytest.raises(NotFound):
        mkv.get("/client/unl/a")
    assert list(mkv.list("/client/unl/")) == ["/client/unl/b"]
    assert list(mkv.list("/client/unl/", unlinked=True)) == ["/client/unl/a"]
    with pytest.raises(NotFound):
        mkv.unlink("/client/unl/a")
    mkv.put("/client/unl/a", b"again")  # an unlinked key may be written again
    assert mkv.get("/client/unl/a") == b"again"


KEYS = ["/enc/a b", "/enc/100%", "/enc/a.b", "/enc/.../z", "/enc/é/ü", "/enc/a?b#c",
        "/enc/a%2Fb", "/enc/+plus", "/enc/semi;colon", "/enc/~tilde"]


def test_keys_are_encoded_exactly_once(mkv: Client, shared_service: MkvService) -> None:
    for i, key in enumerate(KEYS):
        mkv.put(key, f"value {i}".encode())
    for i, key in enumerate(KEYS):
        assert mkv.get(key) == f"value {i}".encode(), key
        assert index_record(shared_service, key) is not None, key
    assert list(mkv.list("/enc/")) == sorted(KEYS, key=str.encode)
    mkv.put("noslash", b"v")  # a key is a path: the "/" is added
    assert index_record(shared_service, "/noslash") is not None
    # a dot segment reaches the service as it is, which refuses it for a new key
    # (requests alone would resolve it and write "/x")
    assert key_path("/enc/../x") == "/enc/%2E%2E/x"
    with pytest.raises(BadRequest) as dots:
        mkv.put("/enc/../x", b"v")
    assert dots.value.error == "bad_key"
    assert index_record(shared_service, "/x") is None


# --- paging, limits, protect -----------------------------------------------------------------------


def test_list_goes_through_every_page(strict: MkvService) -> None:
    keys = [f"/pg/{i:02d}" for i in range(13)]
    client = Client(strict.url)
    for key in keys:
        client.put(key, b"v")
    client.put("/pg-outside", b"v")
    assert list(client.list("/pg/")) == keys

    def list_requests() -> int:
        return len(re.findall(r" GET /pg/\?list\S* 200 ", strict.output()))
    wait_until(lambda: list_requests() == 3, TIMEOUT, "three pages (5 + 5 + 3) in the access log")
    assert list(client.list("/pg/", page=2)) == keys  # 7 pages
    wait_until(lambda: list_requests() == 10, TIMEOUT, "seven more pages")
    assert list(client.list("/pg/nothing-here/")) == []


def test_protect_too_large_and_bad_requests(strict: MkvService) -> None:
    client = Client(strict.url)
    client.put("/strict/k", b"v")
    with pytest.raises(Protected):
        client.delete("/strict/k")
    client.unlink("/strict/k")
    client.delete("/strict/k")
    with pytest.raises(TooLarge) as big:
        client.put("/strict/big", os.urandom(16 * 1024 + 1))
    assert big.value.status == 413
    with pytest.raises(TooLarge):
        client.put("/strict/big", iter([os.urandom(10_000), os.urandom(10_000)]))
    with pytest.raises(BadRequest) as empty:
        client.put("/strict/empty", b"")
    assert empty.value.status == 411
    with pytest.raises(BadRequest) as bad:
        client.put("/strict/ctl\x01", b"v")
    assert bad.value.error == "bad_key"
    with pytest.raises(BadRequest):
        client.stat("/strict/ctl\x01")  # HEAD: the status alone
    assert all(isinstance(e, MkvError) for e in (big.value, empty.value, bad.value))


# --- tokens ---------------------------------------------------------------------------------------


def test_tokens(guarded: MkvService) -> None:
    with pytest.raises(Unauthorized) as none:
        Client(guarded.url).put("/tok/k", b"v")
    assert none.value.status == 401
    with pytest.raises(Forbidden) as wrong:
        Client(guarded.url, token="not-the-token-at-all").put("/tok/k", b"v")
    assert wrong.value.status == 403 and wrong.value.error == "forbidden"
    with pytest.raises(Forbidden):
        Client(guarded.url, token="not-the-token-at-all").delete("/tok/k")
    good = Client(guarded.url, token=TOKEN)
    good.put("/tok/k", b"v")
    assert Client(guarded.url).get("/tok/k") == b"v"  # reads stay open without auth-reads
    assert good.get("/tok/k") == b"v"  # the token goes to the service, not to the volume
    good.delete("/tok/k")


# --- retries: real faults -------------------------------------------------------------------------


def outage(svc: MkvService, vols: list[NginxVolume]) -> None:
    for v in vols:
        v.stop()
    wait_until(lambda: all(volume_status(svc, v.address) == "down" for v in vols), TIMEOUT,
               "every volume marked down")
    time.sleep(HEALTH_CACHE_SECONDS + 0.2)  # every worker's cached health says so too


def restart_after_first_retry(vols: list[NginxVolume], handler: Retries) -> threading.Thread:
    """The volumes come back only once the client has met the outage and said so."""
    def run() -> None:
        if handler.first.wait(TIMEOUT):
            for v in vols:
                v.restart()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_reads_and_writes_retry_through_an_outage(
        volumes: list[NginxVolume], make_service: Callable[..., MkvService],
        retries: Retries) -> None:
    svc = make_service(volumes, extra=FAST_HEALTH)
    client = Client(svc.url, retries=40, backoff=0.05, max_backoff=0.5)
    client.put("/outage/old", b"before")

    outage(svc, volumes)
    with pytest.raises(Unavailable) as once:  # an iterable cannot be sent again: no retry
        client.put("/outage/gen", iter([b"abc"]))
    assert once.value.status == 503 and retries.messages == []
    restarter = restart_after_first_retry(volumes, retries)
    assert client.get("/outage/old") == b"before"  # 503 (every replica down), then 302
    restarter.join(TIMEOUT)
    assert any("503" in m for m in retries.messages), retries.messages

    settle = Retries()
    logging.getLogger("mkv.client").addHandler(settle)
    try:
        outage(svc, volumes)
        restarter = restart_after_first_retry(volumes, settle)
        client.put("/outage/new", b"during")  # 503 (too few volumes), then 201
        restarter.join(TIMEOUT)
    finally:
        logging.getLogger("mkv.client").removeHandler(settle)
    assert any("PUT /outage/new" in m and "503" in m for m in settle.messages), settle.messages
    assert read(svc, "/outage/new") == b"during"


def test_a_delete_waits_out_a_write_in_flight(shared_service: MkvService, mkv: Client,
                                              retries: Retries) -> None:
    """409 while another client's PUT holds the key's lock; then the PUT's value is there
    to delete."""
    key = "/client/inflight"
    body = SlowBody(os.urandom(200_000), chunks=8, delay=0.25)
    writer = threading.Thread(target=lambda: requests.put(kurl(shared_service, key), data=body,
                                                          timeout=TIMEOUT))
    writer.start()
    assert body.started.wait(TIMEOUT)
    wait_until(lambda: health_locks(shared_service) >= 1, TIMEOUT, "the PUT to hold the lock")
    patient = Client(shared_service.url, retries=40, backoff=0.05, max_backoff=0.3)
    patient.delete(key)
    writer.join(TIMEOUT)
    assert any("409" in m for m in retries.messages), retries.messages
    with pytest.raises(NotFound):
        mkv.stat(key)
    impatient = Client(shared_service.url, retries=0)
    body = SlowBody(os.urandom(200_000), chunks=8, delay=0.25)
    writer = threading.Thread(target=lambda: requests.put(kurl(shared_service, key), data=body,
                                                          timeout=TIMEOUT))
    writer.start()
    assert body.started.wait(TIMEOUT)
    wait_until(lambda: health_locks(shared_service) >= 1, TIMEOUT, "the PUT to hold the lock")
    with pytest.raises(Conflict):
        impatient.delete(key)
    writer.join(TIMEOUT)


class LosingRelay(Relay):
    """A TCP relay to the service that passes the first request on but drops its answer
    (closes the client's connection instead): the client cannot know whether the PUT
    was stored. Every later connection is relayed both ways."""

    def answer_limit(self, n: int) -> int | None:
        return 0 if n == 0 else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def test_a_put_whose_answer_was_lost_is_retried_and_found_stored(
        shared_service: MkvService, retries: Retries) -> None:
    relay = LosingRelay(shared_service.port)
    try:
        client = Client(relay.url, retries=3, backoff=0.05)
        client.put("/client/lost-answer", b"stored the first time")
        assert relay.cut.is_set()
        # the retry met 403 key_exists; the md5 and size are this value's: done
        assert any("PUT /client/lost-answer" in m for m in retries.messages), retries.messages
        assert client.get("/client/lost-answer") == b"stored the first time"
    finally:
        relay.close()
    other = LosingRelay(shared_service.port)
    try:
        Client(shared_service.url).put("/client/lost-other", b"someone else's")
        with pytest.raises(KeyExists):  # the retry finds another value: not this put's
            Client(other.url, retries=3, backoff=0.05).put("/client/lost-other", b"mine")
    finally:
        other.close()


def test_no_answer_at_all_is_unavailable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    client = Client(f"http://127.0.0.1:{port}", retries=1, backoff=0.01)
    with pytest.raises(Unavailable) as gone:
        client.get("/k")
    assert gone.value.status is None

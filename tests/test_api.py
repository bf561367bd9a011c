"""The HTTP API end to end: a real `mkv serve` over real nginx volumes, no mocks.

Every test talks HTTP to the service (with `requests`, or with http.client / a raw socket
where `requests` would rewrite the request), then checks what a client sees (statuses,
bodies, headers), what is on the volumes' disks and what the index holds.

To keep the file fast, one service over three volumes is shared by the module
(`shared_service` over `shared_volumes`, from conftest.py); each test uses its own keys (a
per-test prefix). Services with other settings (protect, a size limit, a fallback, a failing
fake volume) are started once each with `start_shared_service`.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote, urlsplit

import pytest
import requests

from mkv.model import State
from tests.cluster import NginxVolume
from tests.conftest import start_volumes
from tests.helpers import (
    CLIENT,
    TIMEOUT,
    FakeVolume,
    SlowBody,
    assert_json_error,
    blob_rel,
    disk_files,
    escape_all,
    get,
    health_locks,
    index_record,
    kurl,
    listing,
    put,
    raw,
    raw_exchange,
    raw_read,
    read,
    sha,
    spooled,
    url,
    wait_until,
)
from tests.service import MkvService

# --- the module's cluster, twice: redirects unsigned, then signed --------------------------------

SECRET = "the-api-suite-redirect-secret"


@pytest.fixture(scope="module", params=["unsigned", "signed"])
def signing(request: pytest.FixtureRequest) -> str:
    """The redirect secret of the module's volumes and service ("" for none). Signed, the
    volumes take only 127.0.0.1 (mkv) as a writer, and the tests' clients follow redirects
    from 127.0.0.2 (tests/helpers.py CLIENT), so every Location they follow is checked."""
    return SECRET if request.param == "signed" else ""


@pytest.fixture(scope="module")
def shared_volumes(tmp_path_factory: pytest.TempPathFactory, signing: str
                   ) -> Iterator[list[NginxVolume]]:
    writers = [ipaddress.ip_network("127.0.0.1/32")] if signing else None
    started = start_volumes(tmp_path_factory.mktemp("api-volumes"), 3, writers=writers,
                            secret=signing)
    yield started
    for volume in started:
        volume.stop()


@pytest.fixture(scope="module")
def start_shared_service(start_shared_service: Callable[..., MkvService], signing: str
                         ) -> Callable[..., MkvService]:
    """conftest's, with the module's redirect secret: every service here signs, or none."""
    def start(volumes: list, **kw: object) -> MkvService:
        if signing:
            kw["extra"] = [*kw.get("extra", ()), "--redirect-secret", signing]  # type: ignore[misc]
        return start_shared_service(volumes, **kw)

    return start


@pytest.fixture(scope="module")
def shared_service(shared_volumes: list[NginxVolume], start_shared_service: Callable[..., MkvService]
                   ) -> MkvService:
    return start_shared_service(shared_volumes, replicas=3)


# --- 1. round trip -----------------------------------------------------------------------


def test_round_trip_redirects_to_a_replica_with_headers_and_files_on_every_volume(
        shared_service: MkvService, shared_volumes: list[NginxVolume]) -> None:
    key = "/rt/hello.bin"
    body = os.urandom(300_000)
    md5 = hashlib.md5(body).hexdigest()
    h = sha(key)

    r = put(shared_service, key, body)
    assert r.status_code == 201, r.text
    gen = index_record(shared_service, key).gen  # the write's generation: in its file names
    assert re.fullmatch("[0-9a-f]{19}", gen), gen

    addresses = {v.address for v in shared_volumes}
    r = get(shared_service, key)
    assert r.status_code == 302
    loc = urlsplit(r.headers["Location"])
    assert loc.scheme == "http"
    assert loc.netloc in addresses
    assert loc.path == f"/{h[0:2]}/{h[2:4]}/{h}.{gen}"
    assert r.headers["Content-Md5"] == md5
    key_volumes = r.headers["Key-Volumes"].split(",")
    assert len(key_volumes) == 3 and set(key_volumes) == addresses
    assert r.headers["Key-Balance"] == "balanced"
    assert r.content == b""

    # Following the redirect gives back the exact bytes (requests follows it itself).
    followed = CLIENT.get(kurl(shared_service, key), timeout=TIMEOUT)
    assert followed.status_code == 200
    assert followed.content == body
    assert [x.status_code for x in followed.history] == [302]

    head = requests.head(kurl(shared_service, key), allow_redirects=False, timeout=TIMEOUT)
    assert head.status_code == 302
    assert head.content == b""
    for name in ("Content-Md5", "Key-Volumes", "Key-Balance"):
        assert head.headers[name] == r.headers[name]
    assert urlsplit(head.headers["Location"]).path == loc.path

    # Every replica, read directly from the volume, has the bytes.
    for vol in shared_volumes:
        assert requests.get(vol.url + loc.path, timeout=TIMEOUT).content == body

    # On disk: blob and one-line JSON sidecar on all three roots.
    for vol in shared_volumes:
        blob = vol.root / h[0:2] / h[2:4] / f"{h}.{gen}"
        sidecar = vol.root / h[0:2] / h[2:4] / f"{h}.{gen}.key"
        assert blob.read_bytes() == body
        text = sidecar.read_text("utf-8")
        assert text.endswith("\n") and text.count("\n") == 1
        assert json.loads(text) == {"key": key, "size": len(body), "md5": md5}

    rec = index_record(shared_service, key)
    assert rec is not None and rec.state is State.LIVE
    assert set(rec.volumes) == addresses and rec.size == len(body) and rec.md5 == md5


# --- 2. bodies that cannot be stored, overwrite --------------------------------------------


def test_put_without_a_usable_length_is_411(shared_service: MkvService,
                                            shared_volumes: list[NginxVolume]) -> None:
    assert_json_error(put(shared_service, "/len/empty", b""), 411)

    def no_chunks() -> Iterator[bytes]:
        yield from ()

    # an empty chunked body: no value, as with Content-Length: 0 (chunked bodies with
    # bytes in them are stored: tests/test_chunked.py)
    r = requests.put(kurl(shared_service, "/len/chunked"), data=no_chunks(), timeout=TIMEOUT)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in r.request.headers
    assert_json_error(r, 411)

    # No Content-Length and no body at all.
    conn = http.client.HTTPConnection("127.0.0.1", shared_service.port, timeout=TIMEOUT)
    try:
        conn.putrequest("PUT", "/len/none")
        conn.endheaders()
        resp = conn.getresponse()
        assert_json_error((resp.status, {k.lower(): v for k, v in resp.getheaders()},
                           resp.read()), 411)
    finally:
        conn.close()

    for key in ("/len/empty", "/len/chunked", "/len/none"):
        assert get(shared_service, key).status_code == 404
        assert disk_files(shared_volumes, key) == []


def test_overwrite_of_a_live_key_is_403_and_keeps_the_value(shared_service: MkvService) -> None:
    key = "/ow/key"
    assert put(shared_service, key, b"original").status_code == 201
    before = get(shared_service, key).headers["Content-Md5"]
    assert_json_error(put(shared_service, key, b"replacement!"), 403)
    assert read(shared_service, key) == b"original"
    after = get(shared_service, key).headers["Content-Md5"]
    assert after == before == hashlib.md5(b"original").hexdigest()


# --- 3. concurrent writers ------------------------------------------------------------------


def test_concurrent_puts_of_one_key_one_wins_one_409(shared_service: MkvService) -> None:
    key = "/race/key"
    slow = SlowBody(os.urandom(1 << 20), chunks=8, delay=0.15)
    fast_body = b"the second writer"
    results: dict[str, requests.Response] = {}

    def first() -> None:
        results["slow"] = requests.put(kurl(shared_service, key), data=slow, timeout=TIMEOUT)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert slow.started.wait(10), "the slow PUT never started sending"
        time.sleep(0.3)  # the service has the headers and holds the key's lock by now
        assert not results, "the slow PUT finished too early for the race"
        results["fast"] = put(shared_service, key, fast_body)
    finally:
        t.join(TIMEOUT)
    assert sorted(r.status_code for r in results.values()) == [201, 409], {
        k: (r.status_code, r.text) for k, r in results.items()}
    assert results["slow"].status_code == 201
    assert_json_error(results["fast"], 409)
    assert read(shared_service, key) == slow.data
    assert index_record(shared_service, key).md5 == hashlib.md5(slow.data).hexdigest()


# --- 4. hostile keys ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/long/" + "k" * 1019,                     # 1025 bytes
    "/long/" + "%C3%A9" * 510,                 # 6 + 1020 = 1026 bytes once decoded
    "/ctl/a%01b", "/ctl/a%7Fb", "/ctl/a%0Ab", "/ctl/a%0D", "/ctl/%00",
    "/utf8/%FF", "/utf8/%C3%28", "/utf8/%ED%A0%80",  # the last: an encoded surrogate
    "/-", "/",
])
def test_bad_keys_are_400_with_json(shared_service: MkvService, path: str) -> None:
    for method, body in (("PUT", b"value"), ("GET", None), ("DELETE", None)):
        assert_json_error(raw(shared_service, method, path, body), 400)


def test_key_length_limit_counts_decoded_utf8_bytes(shared_service: MkvService) -> None:
    longest = "/long-ok/" + "k" * (1024 - 9)
    assert len(longest.encode()) == 1024
    assert put(shared_service, longest, b"v").status_code == 201
    assert read(shared_service, longest) == b"v"
    # 3 + 2 * 510 = 1023 bytes decoded, but 3 + 6 * 510 = 3063 characters on the wire.
    wide = "/w/" + "é" * 510
    assert len(wide.encode()) == 1023
    assert put(shared_service, wide, b"wide").status_code == 201
    assert read(shared_service, wide) == b"wide"
    assert_json_error(put(shared_service, longest + "x", b"v"), 400)


def test_keys_with_dot_segments_are_refused_on_put(shared_service: MkvService) -> None:
    """Clients and proxies resolve "." and ".." segments before sending, so such a key
    could not be named again (sent raw here: requests would resolve them too)."""
    for path in ("/h/dots/../x", "/h/./y/..", "/h/%2E%2E/z", "/h/a\\..\\b"):
        assert_json_error(raw(shared_service, "PUT", path, b"v"), 400)
        assert raw(shared_service, "GET", path)[0] == 404


def test_hostile_but_valid_keys_round_trip_exactly(shared_service: MkvService) -> None:
    # raw request path -> the key it names (keys are the percent-decoded path)
    cases = {
        "/h/with%20space%20s": "/h/with space s",
        "/h/" + quote("ünï cødé/ключ/🔑"): "/h/ünï cødé/ключ/🔑",
        "/h/.dotfile/..dots.../a.": "/h/.dotfile/..dots.../a.",
        "/h//double//slash": "/h//double//slash",
        "/h/q%3Fa%26b%3Dc%23d": "/h/q?a&b=c#d",
        "/h/plus+sign": "/h/plus+sign",
        "/h/pct%2541": "/h/pct%41",
        "/h/slash%2Fenc": "/h/slash/enc",
    }
    for i, (path, key) in enumerate(cases.items()):
        value = f"value {i} of {key!r}".encode()
        status, _, body = raw(shared_service, "PUT", path, value)
        assert status == 201, (path, status, body)
        assert raw_read(shared_service, path) == value, path
        # The same key spelled with every byte but "/" escaped names the same value.
        assert raw_read(shared_service, escape_all(key)) == value, key
        h, gen = sha(key), index_record(shared_service, key).gen
        status, headers, _ = raw(shared_service, "GET", path)
        assert urlsplit(headers["location"]).path == f"/{h[0:2]}/{h[2:4]}/{h}.{gen}"

    # %2F decodes to "/" like any other escape, so /h/slash%2Fenc and /h/slash/enc are one
    # key: writing the other spelling finds it live.
    assert raw(shared_service, "PUT", "/h/slash/enc", b"again")[0] == 403
    assert raw_read(shared_service, "/h/slash%2Fenc") == raw_read(shared_service, "/h/slash/enc")

    # ?list answers the decoded keys, sorted by UTF-8 bytes.
    keys = listing(shared_service, "/h/?list")["keys"]
    assert keys == sorted(cases.values(), key=lambda k: k.encode())


@pytest.mark.parametrize("path", ["/-/anything", "/-/health/x", "/-/ping"])
def test_unknown_service_paths_are_404_with_json(shared_service: MkvService, path: str) -> None:
    for method, body in (("PUT", b"value"), ("GET", None), ("DELETE", None)):
        assert_json_error(raw(shared_service, method, path, body), 404)


def test_scheme_like_text_inside_a_key_is_part_of_the_key(shared_service: MkvService) -> None:
    """Only a target that starts with http:// or https:// is the absolute form: a `://`
    further in must not rewrite the key (a proxy guarding /public/ would be bypassed)."""
    assert put(shared_service, "/victim18", b"theirs").status_code == 201
    status, headers, body = raw(shared_service, "PUT", "/public/x://y/victim18", b"mine")
    assert status == 201 and body == b"" and "content-type" not in headers
    assert raw_read(shared_service, "/public/x://y/victim18") == b"mine"
    assert raw(shared_service, "DELETE", "/public/x://y/victim18")[0] == 204
    assert read(shared_service, "/victim18") == b"theirs"
    assert raw(shared_service, "PUT", "/a://b18", b"ab")[0] == 201
    assert raw_read(shared_service, "/a://b18") == b"ab"
    assert listing(shared_service, "/a:?list")["keys"] == ["/a://b18"]


def test_malformed_request_lines_and_framework_answers_are_json(shared_service: MkvService) -> None:
    host = f"127.0.0.1:{shared_service.port}"
    assert put(shared_service, "/two-spaces/k", b"v").status_code == 201
    lines = raw_exchange(shared_service, f"UNLINK  /two-spaces/k HTTP/1.1\r\nHost: {host}\r\n"
                         "Connection: close\r\n\r\n".encode())
    assert lines and lines[0].startswith(b"HTTP/1.1 400"), lines
    assert read(shared_service, "/two-spaces/k") == b"v"  # not unlinked
    for request in (f"OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n",
                    f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n"):
        method, target = request.split(" ")[:2]
        status, headers, body = raw(shared_service, method, target)
        assert status in (400, 404, 405), (request, status, body)
        assert_json_error((status, headers, body), status)
        assert not json.loads(body)["error"][0].isdigit()
    for method in ("PUT", "DELETE"):
        assert_json_error(raw(shared_service, method, "/-/health", b"x"), 405)


def test_a_list_limit_beyond_64_bits_is_400(shared_service: MkvService) -> None:
    assert_json_error(raw(shared_service, "GET", "/?list&limit=99999999999999999999"), 400)


def test_absolute_form_and_expect_continue(shared_service: MkvService) -> None:
    """What proxies (absolute-form target) and curl (Expect: 100-continue) send."""
    host = f"127.0.0.1:{shared_service.port}"
    lines = raw_exchange(shared_service,
                         f"PUT http://{host}/abs/k%20ey HTTP/1.1\r\nHost: {host}\r\n"
                         "Content-Length: 3\r\nConnection: close\r\n\r\nabc".encode())
    assert lines == [b"HTTP/1.1 201 Created"]
    assert read(shared_service, "/abs/k ey") == b"abc"

    lines = raw_exchange(shared_service,
                         f"PUT /exp/key HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
                         "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode(),
                         body=b"hello")
    assert lines == [b"HTTP/1.1 100 Continue", b"HTTP/1.1 201 Created"]
    assert read(shared_service, "/exp/key") == b"hello"


# --- 5. listing -------------------------------------------------------------------------------


def test_list_prefix_and_paging(shared_service: MkvService) -> None:
    inside = [f"/p/{i:02d}-{'x' * (i % 3)}" for i in range(25)]
    outside = ["/p", "/p0", "/pa/x", "/o/p/x", "/q/p/"]
    for key in inside + outside:
        assert put(shared_service, key, key.encode()).status_code == 201, key

    doc = listing(shared_service, "/p/?list")
    assert doc == {"next": "", "keys": sorted(inside)}

    seen: list[str] = []
    start, pages = "", 0
    while True:
        q = "/p/?list&limit=10" + (f"&start={quote(start, safe='')}" if start else "")
        doc = listing(shared_service, q)
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
    everything = listing(shared_service, "/?list")["keys"]
    assert set(inside + outside) <= set(everything)
    assert everything == sorted(everything, key=lambda k: k.encode())


@pytest.mark.parametrize("query", [
    "/p/?list&limit=abc", "/p/?list&limit=0", "/p/?list&limit=-1", "/p/?list&limit=",
    "/p/?list&limit=1.5", "/p/?list&bogus=1", "/p/?list&unlinked", "/p/?list&list",
    "/p/?start=a", "/somekey?foo=bar", "/somekey?",
])
def test_bad_queries_are_400_with_json(shared_service: MkvService, query: str) -> None:
    r = requests.get(url(shared_service, query), allow_redirects=False, timeout=TIMEOUT)
    if query.endswith("?"):
        # An empty query string is no query at all: a plain GET of a missing key.
        assert_json_error(r, 404)
        return
    assert_json_error(r, 400)


def test_queries_on_writes_are_refused(shared_service: MkvService,
                                       shared_volumes: list[NginxVolume]) -> None:
    """A query never gets silently dropped from a write: PUT /k?x=1 must not store /k."""
    for method, path in (("PUT", "/lp/?list"), ("PUT", "/lp/key?x=1"), ("PUT", "/lp/key?list"),
                         ("DELETE", "/lp/key?list"), ("UNLINK", "/lp/?unlinked")):
        assert_json_error(raw(shared_service, method, path, b"x" if method == "PUT" else None), 400)
    assert_json_error(get(shared_service, "/lp/key"), 404)
    assert disk_files(shared_volumes, "/lp/key") == []
    assert listing(shared_service, "/lp/?list") == {"next": "", "keys": []}


def test_unlinked_lists_only_unlinked_keys(shared_service: MkvService) -> None:
    keys = [f"/ul/{c}" for c in "abcd"]
    for key in keys:
        assert put(shared_service, key, b"v").status_code == 201
    for key in keys[1:3]:
        assert requests.request("UNLINK", kurl(shared_service, key), timeout=TIMEOUT).status_code == 204
    assert listing(shared_service, "/ul/?unlinked") == {"next": "", "keys": keys[1:3]}
    assert listing(shared_service, "/ul/?list") == {"next": "", "keys": [keys[0], keys[3]]}
    page = listing(shared_service, "/ul/?unlinked&limit=1")
    assert page == {"next": keys[2], "keys": [keys[1]]}


# --- 6. DELETE and UNLINK ---------------------------------------------------------------------


def test_delete_removes_the_key_and_its_files(shared_service: MkvService,
                                              shared_volumes: list[NginxVolume]) -> None:
    key = "/del/key"
    assert put(shared_service, key, b"to be deleted").status_code == 201
    assert len(disk_files(shared_volumes, key)) == 6

    r = requests.delete(kurl(shared_service, key), timeout=TIMEOUT)
    assert r.status_code == 204 and r.content == b""
    assert_json_error(get(shared_service, key), 404)
    assert disk_files(shared_volumes, key) == []
    assert index_record(shared_service, key) is None
    assert key not in listing(shared_service, "/del/?list")["keys"]

    assert_json_error(requests.delete(kurl(shared_service, key), timeout=TIMEOUT), 404)
    assert_json_error(requests.delete(kurl(shared_service, "/del/never"), timeout=TIMEOUT), 404)


def test_unlink_hides_the_key_but_keeps_the_files(shared_service: MkvService,
                                                  shared_volumes: list[NginxVolume]) -> None:
    key = "/unl/key"
    assert put(shared_service, key, b"first").status_code == 201
    unlink = lambda: requests.request("UNLINK", kurl(shared_service, key), timeout=TIMEOUT)  # noqa: E731

    r = unlink()
    assert r.status_code == 204 and r.content == b""
    assert_json_error(get(shared_service, key), 404)
    assert requests.head(kurl(shared_service, key), timeout=TIMEOUT).status_code == 404
    assert listing(shared_service, "/unl/?unlinked")["keys"] == [key]
    assert listing(shared_service, "/unl/?list")["keys"] == []
    assert len(disk_files(shared_volumes, key)) == 6  # blobs and sidecars stay
    assert index_record(shared_service, key).state is State.UNLINKED
    assert_json_error(unlink(), 404)
    never = requests.request("UNLINK", kurl(shared_service, "/unl/never"), timeout=TIMEOUT)
    assert_json_error(never, 404)

    # An unlinked key may be written again, and then reads the new value.
    assert put(shared_service, key, b"second value").status_code == 201
    assert read(shared_service, key) == b"second value"
    assert listing(shared_service, "/unl/?unlinked")["keys"] == []
    assert listing(shared_service, "/unl/?list")["keys"] == [key]
    assert index_record(shared_service, key).state is State.LIVE

    # DELETE of an unlinked key removes it for good.
    assert unlink().status_code == 204
    assert requests.delete(kurl(shared_service, key), timeout=TIMEOUT).status_code == 204
    assert listing(shared_service, "/unl/?unlinked")["keys"] == []
    assert disk_files(shared_volumes, key) == []


def test_protect_requires_unlink_before_delete(shared_volumes: list[NginxVolume],
                                               start_shared_service: Callable[..., MkvService]) -> None:
    psvc = start_shared_service(shared_volumes, extra=["--protect", "true"])
    key = "/prot/key"
    assert put(psvc, key, b"precious").status_code == 201
    assert_json_error(requests.delete(kurl(psvc, key), timeout=TIMEOUT), 403)
    assert read(psvc, key) == b"precious"
    assert len(disk_files(shared_volumes, key)) == 6

    assert requests.request("UNLINK", kurl(psvc, key), timeout=TIMEOUT).status_code == 204
    assert requests.delete(kurl(psvc, key), timeout=TIMEOUT).status_code == 204
    assert_json_error(get(psvc, key), 404)
    assert disk_files(shared_volumes, key) == []
    assert_json_error(requests.delete(kurl(psvc, key), timeout=TIMEOUT), 404)


# --- 7. methods -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PATCH", "POST", "FOO", "OPTIONS", "PROPFIND"])
def test_unknown_methods_are_405_with_json(shared_service: MkvService, method: str) -> None:
    r = requests.request(method, kurl(shared_service, "/m/key"), data=b"x", timeout=TIMEOUT)
    doc = assert_json_error(r, 405)
    assert doc["error"] == "method_not_allowed"
    assert "PUT" in r.headers.get("Allow", "")


# --- 8. size limit ------------------------------------------------------------------------------


def test_values_over_max_value_bytes_are_413(shared_volumes: list[NginxVolume],
                                             start_shared_service: Callable[..., MkvService]) -> None:
    lsvc = start_shared_service(shared_volumes, extra=["--max-value-bytes", "1000"])
    for size in (1001, 50_000):
        key = f"/big/{size}"
        assert_json_error(put(lsvc, key, b"x" * size), 413)
        assert_json_error(get(lsvc, key), 404)
        assert disk_files(shared_volumes, key) == []
        assert index_record(lsvc, key) is None
    assert put(lsvc, "/big/1000", b"y" * 1000).status_code == 201
    assert read(lsvc, "/big/1000") == b"y" * 1000


# --- 9. Content-MD5 -----------------------------------------------------------------------------


def test_content_md5_is_checked(shared_service: MkvService,
                                shared_volumes: list[NginxVolume]) -> None:
    body = os.urandom(200_000)
    digest = hashlib.md5(body).digest()

    b64 = base64.b64encode(digest).decode()
    assert put(shared_service, "/md5/b64", body, headers={"Content-MD5": b64}).status_code == 201
    assert put(shared_service, "/md5/hex", body,
               headers={"Content-MD5": digest.hex()}).status_code == 201
    assert put(shared_service, "/md5/HEX", body,
               headers={"Content-MD5": digest.hex().upper()}).status_code == 201
    for key in ("/md5/b64", "/md5/hex", "/md5/HEX"):
        assert read(shared_service, key) == body
        assert get(shared_service, key).headers["Content-Md5"] == digest.hex()

    wrong = hashlib.md5(body + b"!").digest()
    for i, header in enumerate([base64.b64encode(wrong).decode(), wrong.hex(), "not-a-digest",
                                base64.b64encode(b"short").decode()]):
        key = f"/md5/wrong{i}"
        assert_json_error(put(shared_service, key, body, headers={"Content-MD5": header}), 400)
        assert_json_error(get(shared_service, key), 404)
        assert disk_files(shared_volumes, key) == []
        assert index_record(shared_service, key) is None
        # and no lock was left behind: the right digest is accepted at once
        assert put(shared_service, key, body, headers={"Content-MD5": b64}).status_code == 201


# --- 10. a client that goes away ------------------------------------------------------------------


def test_client_disconnect_mid_upload_leaves_nothing(shared_service: MkvService,
                                                     shared_volumes: list[NginxVolume]) -> None:
    key = "/gone/big"
    sock = socket.create_connection(("127.0.0.1", shared_service.port), timeout=TIMEOUT)
    try:
        sock.sendall(f"PUT {key} HTTP/1.1\r\nHost: mkv\r\nContent-Length: {64 << 20}\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode())
        chunk = b"z" * (1 << 20)
        for _ in range(32):
            sock.sendall(chunk)
    finally:
        sock.close()

    # The upload is abandoned: its lock is released, nothing is visible, nothing is left.
    wait_until(lambda: health_locks(shared_service) == 0, 10, "the abandoned PUT to release its lock")
    assert_json_error(get(shared_service, key), 404)
    assert key not in listing(shared_service, "/gone/?list")["keys"]
    assert index_record(shared_service, key) is None
    wait_until(lambda: disk_files(shared_volumes, key) == [], 5, "partial files to be removed")
    wait_until(lambda: spooled(shared_volumes) == [], 5, "nginx to discard the partial bodies")

    body = os.urandom(1 << 20)
    deadline = time.monotonic() + 5
    while True:
        r = put(shared_service, key, body)
        if r.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 201, r.text
    assert read(shared_service, key) == body
    assert len(disk_files(shared_volumes, key)) == 6


# --- 11. a failing volume -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 507])
def test_volume_error_during_put_fails_cleanly(status: int, fake_volume: FakeVolume,
                                               failing_service: MkvService,
                                               shared_volumes: list[NginxVolume]) -> None:
    real, fsvc = shared_volumes[:2], failing_service
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
    (tried,) = fake_volume.puts[before:]  # the fake really was a replica
    assert tried.startswith(blob_rel(key) + "."), tried
    assert_json_error(get(fsvc, key), 404)
    assert key not in listing(fsvc, "/fail/?list")["keys"]
    assert index_record(fsvc, key) is None
    assert disk_files(real, key) == []  # partial copies on the good volumes removed
    # the lock is released: the next attempt fails again instead of 409 — as 502, or as 503
    # while the worker still counts the volume's 5xx against its health. A 409 can still
    # come for a moment: the health process holds the key's lock while it removes the
    # failed write's due copies (docs/design.md, "Pending operations"); never for long.
    deadline = time.monotonic() + 10
    while (again := put(fsvc, key, body).status_code) == 409 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert again in (502, 503)
    assert disk_files(real, key) == []
    assert spooled(real) == []


# --- 12. missing keys and the fallback ------------------------------------------------------------


def test_missing_key_is_404_with_json(shared_service: MkvService) -> None:
    doc = assert_json_error(get(shared_service, "/missing/key"), 404)
    assert doc["error"] == "not_found"
    assert requests.head(kurl(shared_service, "/missing/key"), timeout=TIMEOUT).status_code == 404


def test_head_of_a_missing_key_is_404_with_no_length_and_no_body(
        shared_service: MkvService) -> None:
    """On the wire: the answer to HEAD ends with its headers (the GET pipelined behind
    it is answered next), Content-Length 0; the GET keeps its JSON error."""
    host = f"127.0.0.1:{shared_service.port}"
    with socket.create_connection(("127.0.0.1", shared_service.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"HEAD /missing/head HTTP/1.1\r\nHost: {host}\r\n\r\n"
                     f"GET /missing/head HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        while more := sock.recv(65536):
            data += more
    head, rest = data.split(b"\r\n\r\n", 1)
    head_lines = head.lower().split(b"\r\n")
    assert head_lines[0] == b"http/1.1 404 not found"
    assert b"content-length: 0" in head_lines
    assert not any(line.startswith(b"content-type:") for line in head_lines)
    assert rest.startswith(b"HTTP/1.1 404 Not Found\r\n")  # nothing between the two answers
    get_head, get_body = rest.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in get_head.lower()
    assert f"content-length: {len(get_body)}".encode() in get_head.lower()
    assert b'"not_found"' in get_body

    # a client sees the same
    r = requests.head(kurl(shared_service, "/missing/head"), timeout=TIMEOUT)
    assert r.status_code == 404 and r.headers["Content-Length"] == "0" and r.content == b""
    bad = requests.head(shared_service.url + "/bad/%FF", timeout=TIMEOUT)
    assert bad.status_code == 400 and bad.headers["Content-Length"] == "0"


def test_fallback_redirects_missing_keys(shared_volumes: list[NginxVolume],
                                         start_shared_service: Callable[..., MkvService]) -> None:
    fallback = "127.0.0.1:9"
    fsvc = start_shared_service(shared_volumes, extra=["--fallback", fallback])
    r = get(fsvc, "/fb/missing")
    assert r.status_code == 302
    assert r.headers["Location"] == f"http://{fallback}/fb/missing"
    r = get(fsvc, "/fb/with space")
    assert r.status_code == 302
    assert r.headers["Location"] == f"http://{fallback}/fb/with%20space"
    # A key the service has still goes to a volume.
    assert put(fsvc, "/fb/here", b"here").status_code == 201
    here = urlsplit(get(fsvc, "/fb/here").headers["Location"])
    assert here.netloc in {v.address for v in shared_volumes}


# --- 13. health and metrics -----------------------------------------------------------------------


def test_health_and_metrics(shared_service: MkvService,
                            shared_volumes: list[NginxVolume]) -> None:
    r = requests.get(url(shared_service, "/-/health"), timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    doc = r.json()
    assert doc["writer"]["up"] is True
    assert len(doc["volumes"]) == 3
    assert {v["volume"] for v in doc["volumes"]} == {v.address for v in shared_volumes}

    def requests_total() -> dict[tuple[str, str], float]:
        r = requests.get(url(shared_service, "/-/metrics"), timeout=TIMEOUT)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        out = {}
        for ln in r.text.splitlines():
            if m := re.match(r'mkv_requests_total\{method="(\w+)",status="(\d+)"\} (\S+)$', ln):
                out[m[1], m[2]] = float(m[3])
        return out

    before = requests_total()
    assert put(shared_service, "/metrics/key", b"m").status_code == 201
    for _ in range(3):
        get(shared_service, "/metrics/key")
    get(shared_service, "/metrics/missing")
    after = requests_total()
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in (("PUT", "201"), ("GET", "302"),
                                                             ("GET", "404"))}
    assert grown == {("PUT", "201"): 1, ("GET", "302"): 3, ("GET", "404"): 1}, (before, after)
